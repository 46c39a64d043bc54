"""TLS credentials and bearer-token authentication of the gRPC server (grpc.aio).

    credentials = server_credentials(config)      # None: plaintext
    server = grpc.aio.server(interceptors=interceptors(config), ...)
    server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    print(security_summary(config))               # "TLS (mutual, client CA ca.pem), token auth"
    if exposed_without_protection(config.host, config): print(exposure_warning(config.host, config))

The token is read once at start from ``config.auth_token_file``; every RPC but those of the
health service (``/grpc.health.v1.Health/``, for load balancers and orchestrators) must carry
``authorization: Bearer <token>`` metadata, or it ends UNAUTHENTICATED before any handler runs.
"""
from __future__ import annotations

import hmac
import logging
import os
from typing import Awaitable, Callable, Optional

import grpc
from grpc import aio

from ..credentials import SecurityError, check_key_pair, is_loopback, read_pem, read_token_file
from .logs import log_event

__all__ = ["SecurityError", "TokenAuthInterceptor", "exposed_without_protection", "exposure_warning",
           "interceptors", "security_summary", "server_credentials"]

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
AUTH_HINT = "send the metadata 'authorization: Bearer <token>' (explainrt client: --token-file or EXPLAINRT_TOKEN)"


def server_credentials(config) -> Optional[grpc.ServerCredentials]:
    """TLS credentials from ``config.tls_cert``/``tls_key`` (PEM), or None when neither is set.

    With ``config.tls_client_ca`` the server asks every client for a certificate signed by that CA
    (mutual TLS) and refuses the handshake without one. A missing, unreadable or invalid file, a
    certificate without its key (or a key without its certificate, or a key of another
    certificate), or a client CA without a server certificate raises ``SecurityError``.
    """
    cert, key, client_ca = config.tls_cert, config.tls_key, config.tls_client_ca
    if not cert and not key:
        if client_ca:
            raise SecurityError(f"--tls-client-ca {client_ca!r} needs TLS: give the server's certificate and key "
                                "too (--tls-cert, --tls-key)")
        return None
    if not cert or not key:
        missing, given = ("--tls-cert", f"--tls-key {key!r}") if key else ("--tls-key", f"--tls-cert {cert!r}")
        raise SecurityError(f"{given} needs {missing} as well: TLS takes the server's certificate and its private key")
    chain = read_pem(cert, "server certificate", "--tls-cert")
    private_key = read_pem(key, "server key", "--tls-key", key=True)
    check_key_pair(cert, key, "server", ("--tls-cert", "--tls-key"))
    roots = read_pem(client_ca, "client CA", "--tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


def interceptors(config) -> list[aio.ServerInterceptor]:
    """The server interceptors for ``config``: a ``TokenAuthInterceptor`` with ``auth_token_file``, else none.

    The token file is read here (``SecurityError`` if it is missing, unreadable or empty).
    """
    if not config.auth_token_file:
        return []
    return [TokenAuthInterceptor(read_token_file(config.auth_token_file, "--auth-token-file"))]


class TokenAuthInterceptor(aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except the health service's.

    The token is compared in constant time. A call without the metadata, with a value that is
    not ``Bearer <token>``, or with another token ends UNAUTHENTICATED (the message says which)
    before its handler runs, for unary and streaming methods alike.
    """

    def __init__(self, token: str, exempt_prefixes: tuple[str, ...] = (HEALTH_PREFIX,)):
        if not token:
            raise SecurityError("the auth token is empty; write a token into the --auth-token-file")
        self._token = token.encode("ascii")
        self._exempt = tuple(exempt_prefixes)

    def check(self, metadata) -> Optional[str]:
        """None when ``metadata`` (key, value pairs) has the token, else why not: missing, malformed or wrong."""
        values = [value for key, value in (metadata or ()) if key.lower() == "authorization"]
        if not values:
            return "missing"
        if len(values) > 1:
            return "malformed"
        value = values[0].decode("latin-1") if isinstance(values[0], bytes) else str(values[0])
        scheme, _, credential = value.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return "malformed"
        try:
            presented = credential.encode("ascii")
        except UnicodeEncodeError:
            return "wrong"
        return None if hmac.compare_digest(presented, self._token) else "wrong"

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[Optional[grpc.RpcMethodHandler]]],
                                handler_call_details: grpc.HandlerCallDetails) -> Optional[grpc.RpcMethodHandler]:
        method = handler_call_details.method or ""
        if method.startswith(self._exempt):
            return await continuation(handler_call_details)
        reason = self.check(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if reason is None or handler is None:  # an unknown method stays UNIMPLEMENTED
            return handler
        return _refusal(handler, method, reason)


_MESSAGES = {
    "missing": f"missing token: this server requires a bearer token and the call carried none; {AUTH_HINT}",
    "malformed": f"malformed token: the authorization metadata must be one 'Bearer <token>' value; {AUTH_HINT}",
    "wrong": "wrong token: the token is not this server's; check the token file or EXPLAINRT_TOKEN",
}


def _refusal(handler: grpc.RpcMethodHandler, method: str, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that ends the call UNAUTHENTICATED at once."""
    message = _MESSAGES[reason]

    async def abort(context) -> None:
        log_event(log, "unauthenticated", logging.WARNING, method=method, reason=reason, peer=context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def unary_response(_request, context):
        await abort(context)

    async def stream_response(_request, context):
        await abort(context)
        yield  # an async generator, as grpc.aio expects of a response-streaming handler

    serializers = dict(request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_response, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary_response, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream_response, **serializers)
    return grpc.unary_unary_rpc_method_handler(unary_response, **serializers)


def security_summary(config) -> str:
    """How the server is protected, for the start banner: e.g. 'TLS (mutual, client CA ca.pem), token auth'."""
    if config.tls_cert and config.tls_client_ca:
        transport = f"TLS (mutual, client CA {os.path.basename(config.tls_client_ca)})"
    elif config.tls_cert:
        transport = "TLS"
    else:
        transport = "plaintext"
    return f"{transport}, {'token auth' if config.auth_token_file else 'no auth'}"


def exposed_without_protection(host: str, config) -> bool:
    """True when ``host`` is not loopback ('[::]', '0.0.0.0', a LAN address, a name) and calls there are
    unprotected: without TLS (traffic and any token readable on the wire), or without authentication
    (neither a token nor client certificates: anyone who reaches the port may call)."""
    if is_loopback(host):
        return False
    return not config.tls_cert or not (config.auth_token_file or config.tls_client_ca)


def exposure_warning(host: str, config) -> Optional[str]:
    """What to warn about when ``exposed_without_protection(host, config)`` (no 'warning:' prefix), else None."""
    if not exposed_without_protection(host, config):
        return None
    problems = []
    if not config.tls_cert:
        problems.append("without TLS (requests, images and any token travel in clear text: --tls-cert/--tls-key)")
    if not (config.auth_token_file or config.tls_client_ca):
        problems.append("without authentication (anyone who reaches the port may call: --auth-token-file "
                        "or --tls-client-ca)")
    return f"serving on {host}, reachable from other machines, " + " and ".join(problems) + \
        "; bind 127.0.0.1 (the default) to keep it on this machine"
