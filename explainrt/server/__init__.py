"""gRPC server of explainrt: ``explainrt serve --models DIR`` (see app.ExplainServer).

Modules: app (server, config, shutdown), service (the thin servicer, status codes), tasks
(request validation, response building), scheduler (bounded queue + workers), models (model
directory), metrics (Prometheus), codec (tensors on the wire), logs (structured logs), cli.
Importing this package does not import grpc; the submodules do.
"""

__all__ = ["ExplainServer", "ServerConfig"]


def __getattr__(name):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
