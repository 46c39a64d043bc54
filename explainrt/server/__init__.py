"""gRPC server of explainrt: ``explainrt serve --models DIR`` (see app.ExplainServer).

Modules: app (server, config, shutdown), service (the thin servicer, status codes), tasks
(request validation, response building), scheduler (bounded queue + workers), models (model
directory), metrics (Prometheus), codec (tensors on the wire), logs (structured logs), cli.
Importing this package does not import grpc; the submodules do.

    explainrt export efficientnet-lite0 -o models/lite0.onnx
    explainrt serve --models models --port 50051 --metrics-port 9100
    explainrt client --url localhost:50051 --method sidu cat.jpg -o out
    grpcurl -plaintext localhost:50051 list                      # reflection: no .proto needed
    grpcurl -plaintext -d '{"service": "lite0"}' localhost:50051 grpc.health.v1.Health/Check
    curl localhost:9100/metrics                                  # Prometheus

Status codes: INVALID_ARGUMENT bad input (image, tensor, method, parameter, class, NaN);
NOT_FOUND unknown model; RESOURCE_EXHAUSTED full queue or oversized message; DEADLINE_EXCEEDED
and CANCELLED stop the request's work between two chunks of masked passes; UNAVAILABLE while
loading or shutting down; INTERNAL only for bugs.
"""

__all__ = ["ExplainServer", "ServerConfig"]


def __getattr__(name):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
