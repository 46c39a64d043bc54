"""TLS, mutual TLS and bearer tokens (explainrt.server.security, the client's options) on a test grpc.aio server.

The server here is the tests' own: a trivial service of each streaming kind, a stand-in
ExplainService (ListModels, ExplainStream) and the real health servicer, with the real
``server_credentials`` and ``interceptors``; so these tests do not depend on the app.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from explainrt.cli import main
from explainrt.client import ExplainClient, RemoteError
from explainrt.credentials import SecurityError, is_loopback, read_token_file
from explainrt.proto.explainrt.v1 import explainrt_pb2 as pb
from explainrt.proto.explainrt.v1 import explainrt_pb2_grpc as pb_grpc
from explainrt.server.config import ServerConfig
from explainrt.server.security import (TokenAuthInterceptor, exposed_without_protection, exposure_warning,
                                       interceptors, security_summary, server_credentials)
from security_helpers import TOKEN, pki, token_file, write_token  # noqa: F401 - fixtures

KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


# ---- the test server --------------------------------------------------------------------
class _Echo:
    """test.Echo/<kind>: answers b'ok:' + the (first) request, as raw bytes."""

    @staticmethod
    async def unary_unary(request, _context):
        return b"ok:" + request

    @staticmethod
    async def unary_stream(request, _context):
        yield b"ok:" + request
        yield b"ok:" + request

    @staticmethod
    async def stream_unary(requests, _context):
        return b"ok:" + b"".join([r async for r in requests])

    @staticmethod
    async def stream_stream(requests, _context):
        async for r in requests:
            yield b"ok:" + r


class _FakeExplain(pb_grpc.ExplainServiceServicer):
    """Enough of ExplainService for the client: one model, and a stream that answers each item with an error."""

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelSummary(name="fake", input_size=[2, 3], num_classes=4,
                                                             backend="none", device="cpu")])

    async def ExplainStream(self, requests, context):
        index = 0
        async for request in requests:
            yield pb.ExplainStreamResponse(index=index, request_id=request.request_id,
                                           error=pb.ItemError(code=5, code_name="NOT_FOUND", message="fake"))
            index += 1


class AioTestServer:
    """A grpc.aio server on 127.0.0.1 (free port), on its own event loop thread, secured from ``config``."""

    def __init__(self, config: ServerConfig):
        self.config, self.port = config, None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="aio-test-server", daemon=True)

    def start(self) -> "AioTestServer":
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error[0]
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error.append(exc)
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        server = grpc.aio.server(interceptors=interceptors(self.config))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {
            kind: getattr(grpc, f"{kind}_rpc_method_handler")(getattr(_Echo, kind)) for kind in KINDS})])
        pb_grpc.add_ExplainServiceServicer_to_server(_FakeExplain(), server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        credentials = server_credentials(self.config)
        address = f"{self.config.host}:0"
        self.port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        await server.start()
        self._server = server

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@contextlib.contextmanager
def serving(**security):
    server = AioTestServer(ServerConfig(models="", host="127.0.0.1", **security)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_server(pki):
    with serving(tls_cert=pki.server_cert, tls_key=pki.server_key) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki):
    with serving(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca) as server:
        yield server


@pytest.fixture(scope="module")
def token_server(token_file):
    with serving(auth_token_file=token_file) as server:
        yield server


def _read(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _tls_channel(port, ca, cert=None, key=None, options=()):
    credentials = grpc.ssl_channel_credentials(_read(ca), _read(key) if key else None, _read(cert) if cert else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=list(options))


def _call(channel, kind: str, metadata=None, timeout: float = 5.0) -> list[bytes]:
    """Call test.Echo/<kind> with b'x'; the responses as a list."""
    method = getattr(channel, kind)(f"/test.Echo/{kind}")
    request = iter([b"x"]) if kind.startswith("stream") else b"x"
    reply = method(request, timeout=timeout, metadata=metadata)
    return list(reply) if kind.endswith("stream") else [reply]


def _health(channel, metadata=None) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ---- TLS --------------------------------------------------------------------------------
def test_tls_with_the_right_ca_works(tls_server, pki):
    with _tls_channel(tls_server.port, pki.ca) as channel:
        assert _call(channel, "unary_unary") == [b"ok:x"]
        assert _call(channel, "stream_stream") == [b"ok:x"]
        assert _health(channel) == "SERVING"
    with ExplainClient(f"127.0.0.1:{tls_server.port}", timeout=5, tls_ca=pki.ca) as client:
        assert client.tls
        assert [m["name"] for m in client.list_models()] == ["fake"]
        assert client.health() == "SERVING"
    with ExplainClient(f"localhost:{tls_server.port}", timeout=5, tls_ca=pki.ca) as client:  # the DNS name
        assert client.list_models()[0]["num_classes"] == 4


def test_tls_with_another_ca_fails_the_handshake(tls_server, pki):
    with ExplainClient(f"127.0.0.1:{tls_server.port}", timeout=5, retries=0, tls_ca=pki.other_ca) as client:
        with pytest.raises(RemoteError) as err:
            client.list_models()
    assert err.value.code == "UNAVAILABLE"
    assert "CERTIFICATE_VERIFY_FAILED" in err.value.message and "not signed by the CA given" in err.value.message


def test_plaintext_client_against_a_tls_server_fails(tls_server):
    with ExplainClient(f"127.0.0.1:{tls_server.port}", timeout=5, retries=0) as client:
        assert not client.tls
        with pytest.raises(RemoteError) as err:
            client.list_models()
    assert err.value.code == "UNAVAILABLE"
    assert "if the server uses TLS, pass tls_ca / --tls-ca" in err.value.message


def test_tls_client_against_a_plaintext_server_fails(token_server, pki):
    with ExplainClient(f"127.0.0.1:{token_server.port}", timeout=5, retries=0, tls_ca=pki.ca, token=TOKEN) as client:
        with pytest.raises(RemoteError) as err:
            client.list_models()
    assert err.value.code == "UNAVAILABLE"
    assert "the server does not speak TLS" in err.value.message


def test_tls_server_name_override_for_a_certificate_of_another_name(pki):
    with serving(tls_cert=pki.named_cert, tls_key=pki.named_key) as server:
        url = f"127.0.0.1:{server.port}"
        with ExplainClient(url, timeout=5, retries=0, tls_ca=pki.ca) as client:
            with pytest.raises(RemoteError) as err:
                client.list_models()  # the certificate names explainrt.test, not 127.0.0.1
            assert err.value.code == "UNAVAILABLE"
            assert "pass tls_server_name / --tls-server-name" in err.value.message
        with ExplainClient(url, timeout=5, tls_ca=pki.ca, tls_server_name="explainrt.test") as client:
            assert client.list_models()[0]["name"] == "fake"


def test_mutual_tls_needs_a_client_certificate_of_the_ca(mtls_server, pki):
    url = f"127.0.0.1:{mtls_server.port}"
    with ExplainClient(url, timeout=5, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) as client:
        assert [m["name"] for m in client.list_models()] == ["fake"]
        assert [type(item).__name__ for item in client.stream([pb.ExplainRequest(request_id="a")])] == ["RemoteError"]
    for cert, key, hint in ((None, None, "pass tls_cert/tls_key"),
                            (pki.other_client_cert, pki.other_client_key, "signed by its --tls-client-ca")):
        with ExplainClient(url, timeout=5, retries=0, tls_ca=pki.ca, tls_cert=cert, tls_key=key) as client:
            with pytest.raises(RemoteError) as err:
                client.list_models()
            assert err.value.code == "UNAVAILABLE", (cert, err.value)
            assert hint in err.value.message
    with _tls_channel(mtls_server.port, pki.ca) as channel:  # not even the health service without a certificate
        with pytest.raises(grpc.RpcError) as err:
            _health(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- tokens -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_token_right_wrong_missing_malformed_on_every_kind_of_method(token_server, kind):
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        assert _call(channel, kind, metadata=[("authorization", f"Bearer {TOKEN}")])[0] == b"ok:x"
        assert _call(channel, kind, metadata=[("authorization", f"bearer  {TOKEN}")])[0] == b"ok:x"  # scheme's case
        for metadata, reason in ((None, "missing token"), ([("x-other", "1")], "missing token"),
                                 ([("authorization", "Bearer wrong-token")], "wrong token"),
                                 ([("authorization", f"Bearer {TOKEN}x")], "wrong token"),
                                 ([("authorization", f"Bearer {TOKEN[:-1]}")], "wrong token"),
                                 ([("authorization", TOKEN)], "malformed token"),
                                 ([("authorization", f"Basic {TOKEN}")], "malformed token"),
                                 ([("authorization", "Bearer ")], "malformed token")):
            with pytest.raises(grpc.RpcError) as err:
                _call(channel, kind, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, err.value)
            assert err.value.details().startswith(reason), err.value.details()
            assert TOKEN not in err.value.details()


def test_health_needs_no_token_but_unknown_methods_stay_unimplemented(token_server):
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        assert _health(channel) == "SERVING"
        assert _health(channel, metadata=[("authorization", "Bearer wrong")]) == "SERVING"
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/test.Echo/Nope")(b"x", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with ExplainClient(f"127.0.0.1:{token_server.port}", timeout=5) as client:
        assert client.health() == "SERVING"


def test_client_sends_the_token_on_unary_calls_and_streams(token_server, monkeypatch):
    monkeypatch.delenv("EXPLAINRT_TOKEN", raising=False)
    url = f"127.0.0.1:{token_server.port}"
    with ExplainClient(url, timeout=5, token=TOKEN) as client:
        assert client.list_models()[0]["name"] == "fake"
        items = list(client.stream([pb.ExplainRequest(request_id="a"), pb.ExplainRequest(request_id="b")]))
        assert [(item.code, item.request_id) for item in items] == [("NOT_FOUND", "a"), ("NOT_FOUND", "b")]
    for token in (None, "wrong-token"):
        # A retried UNAUTHENTICATED would wait 5 s before its second try.
        with ExplainClient(url, timeout=5, retries=3, backoff=5.0, token=token) as client:
            t0 = time.monotonic()
            with pytest.raises(RemoteError) as err:
                client.list_models()
            assert time.monotonic() - t0 < 2.0, "UNAUTHENTICATED must not be retried"
            assert err.value.code == "UNAUTHENTICATED"
            assert err.value.message.startswith("wrong token" if token else "missing token")
            with pytest.raises(RemoteError) as err:
                list(client.stream([pb.ExplainRequest(request_id="a")]))
            assert err.value.code == "UNAUTHENTICATED"


def test_client_takes_the_token_from_explainrt_token(token_server, monkeypatch):
    url = f"127.0.0.1:{token_server.port}"
    monkeypatch.setenv("EXPLAINRT_TOKEN", TOKEN)
    with ExplainClient(url, timeout=5) as client:
        assert client.list_models()[0]["name"] == "fake"
        assert [item.code for item in client.stream([pb.ExplainRequest()])] == ["NOT_FOUND"]
    with ExplainClient(url, timeout=5, token="wrong-token") as client:  # the argument wins over the variable
        with pytest.raises(RemoteError, match="UNAUTHENTICATED"):
            client.list_models()
    monkeypatch.setenv("EXPLAINRT_TOKEN", "")  # empty: no token
    with ExplainClient(url, timeout=5) as client:
        with pytest.raises(RemoteError, match="missing token"):
            client.list_models()


def test_mutual_tls_and_token_together(pki, token_file):
    with serving(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca,
                 auth_token_file=token_file) as server:
        tls = dict(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        with ExplainClient(f"127.0.0.1:{server.port}", timeout=5, token=TOKEN, **tls) as client:
            assert client.list_models()[0]["name"] == "fake"
        with ExplainClient(f"127.0.0.1:{server.port}", timeout=5, token="wrong-token", **tls) as client:
            with pytest.raises(RemoteError) as err:
                client.list_models()
            assert err.value.code == "UNAUTHENTICATED"
            assert client.health() == "SERVING"


def test_interceptor_check_says_why():
    check = TokenAuthInterceptor(TOKEN).check
    assert check([("authorization", f"Bearer {TOKEN}")]) is None
    assert check([("Authorization", f"Bearer {TOKEN}".encode())]) is None
    assert check(None) == check(()) == "missing"
    assert check([("authorization", "Bearer a"), ("authorization", f"Bearer {TOKEN}")]) == "malformed"
    assert check([("authorization", "Bearer héllo")]) == "wrong"
    with pytest.raises(SecurityError):
        TokenAuthInterceptor("")


# ---- the command line client ------------------------------------------------------------
def test_cli_client_with_tls_and_a_token_file(pki, token_file, capsys, monkeypatch):
    monkeypatch.delenv("EXPLAINRT_TOKEN", raising=False)
    with serving(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca,
                 auth_token_file=token_file) as server:
        base = ["client", "--url", f"127.0.0.1:{server.port}", "--timeout", "5", "--tls-ca", pki.ca,
                "--tls-cert", pki.client_cert, "--tls-key", pki.client_key]
        assert main(base + ["--token-file", token_file, "--list-models"]) == 0
        assert capsys.readouterr().out.split()[0] == "fake"
        assert main(base + ["--health"]) == 0  # no token needed
        assert capsys.readouterr().out.strip() == "SERVING"
        assert main(base + ["--list-models"]) == 2
        err = capsys.readouterr().err
        assert "UNAUTHENTICATED" in err and "missing token" in err and "--token-file" in err
        monkeypatch.setenv("EXPLAINRT_TOKEN", TOKEN)
        assert main(base + ["--list-models"]) == 0
        assert capsys.readouterr().out.split()[0] == "fake"
        assert main(base[:-4] + ["--list-models"]) == 2  # no client certificate: the handshake fails
        assert "UNAVAILABLE" in capsys.readouterr().err


def test_cli_client_refuses_bad_security_options(pki, tmp_path, capsys):
    base = ["client", "--url", "127.0.0.1:1", "--list-models"]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for extra, message in ((["--tls-cert", pki.client_cert], "needs tls_key"),
                           (["--tls-ca", str(tmp_path / "missing.pem")], "no such file"),
                           (["--tls-ca", pki.server_key], "certificate and key swapped"),
                           (["--token-file", str(empty)], "is empty"),
                           (["--tls-server-name", "x"], "needs TLS")):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra


# ---- configuration errors ---------------------------------------------------------------
def test_server_credentials_errors(pki, tmp_path):
    def creds(**kw):
        return server_credentials(ServerConfig(models="", **kw))

    assert creds() is None
    assert isinstance(creds(tls_cert=pki.server_cert, tls_key=pki.server_key), grpc.ServerCredentials)
    assert isinstance(creds(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca),
                      grpc.ServerCredentials)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    fake_cert = tmp_path / "fake.pem"
    fake_cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(_read(pki.server_key), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    unreadable = tmp_path / "unreadable.key"
    unreadable.write_bytes(_read(pki.server_key))
    unreadable.chmod(0)
    cases = [
        (dict(tls_cert=pki.server_cert), "--tls-cert '%s' needs --tls-key" % pki.server_cert),
        (dict(tls_key=pki.server_key), "needs --tls-cert"),
        (dict(tls_client_ca=pki.ca), "needs TLS"),
        (dict(tls_cert=str(tmp_path / "nope.crt"), tls_key=pki.server_key), "no such file"),
        (dict(tls_cert=str(tmp_path), tls_key=pki.server_key), "is a directory"),
        (dict(tls_cert=pki.server_key, tls_key=pki.server_cert), "certificate and key swapped"),
        (dict(tls_cert=str(garbage), tls_key=pki.server_key), "does not hold PEM certificates"),
        (dict(tls_cert=str(fake_cert), tls_key=pki.server_key), "holds no valid certificate"),
        (dict(tls_cert=pki.server_cert, tls_key=pki.client_key), "the key does not belong to the certificate"),
        (dict(tls_cert=pki.server_cert, tls_key=str(encrypted)), "protected by a password"),
        (dict(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=str(garbage)), "client CA"),
    ]
    if os.geteuid() != 0:  # root reads any file
        cases.append((dict(tls_cert=pki.server_cert, tls_key=str(unreadable)), "cannot be read"))
    for kw, message in cases:
        with pytest.raises(SecurityError) as err:
            creds(**kw)
        assert message in str(err.value), (kw, str(err.value))


def test_token_file_rules(tmp_path, caplog):
    path = tmp_path / "token"
    assert read_token_file(write_token(path, "abc")) == "abc"  # the newline stripped
    assert interceptors(ServerConfig(models="")) == []
    [interceptor] = interceptors(ServerConfig(models="", auth_token_file=str(path)))
    assert isinstance(interceptor, TokenAuthInterceptor)
    assert interceptor.check([("authorization", "Bearer abc")]) is None
    for content, message in (("", "is empty"), ("  \n\t\n", "is empty"), ("two words", "printable ASCII"),
                             ("tökén", "not ASCII")):
        path.write_text(content, encoding="utf-8")
        with pytest.raises(SecurityError, match=message):
            interceptors(ServerConfig(models="", auth_token_file=str(path)))
    with pytest.raises(SecurityError, match="no such file"):
        interceptors(ServerConfig(models="", auth_token_file=str(tmp_path / "missing")))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        write_token(path, "abc", mode=0o600)
        read_token_file(path)
        assert not caplog.records
        write_token(path, "abc", mode=0o644)
        assert read_token_file(path) == "abc"
    assert "can be read by every user" in caplog.text and "chmod 600" in caplog.text


def test_client_option_errors(pki, tmp_path):
    for kwargs, message in ((dict(tls_cert=pki.client_cert), "tls_cert (--tls-cert) needs tls_key"),
                            (dict(tls_key=pki.client_key), "needs tls_cert"),
                            (dict(tls_ca=str(tmp_path / "none.pem")), "CA certificate --tls-ca"),
                            (dict(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.server_key),
                             "does not belong"),
                            (dict(tls_server_name="x"), "needs TLS"),
                            (dict(token="two words"), "printable ASCII"),
                            (dict(token=""), "non-empty")):
        with pytest.raises(SecurityError, match=re.escape(message)):
            ExplainClient("127.0.0.1:1", **kwargs)


def test_summary_and_exposure():
    def config(**kw):
        return ServerConfig(models="", **kw)

    tls = dict(tls_cert="/x/server.crt", tls_key="/x/server.key")
    assert security_summary(config()) == "plaintext, no auth"
    assert security_summary(config(auth_token_file="/x/t", **tls)) == "TLS, token auth"
    assert security_summary(config(tls_client_ca="/x/ca.pem", **tls)) == "TLS (mutual, client CA ca.pem), no auth"
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and not exposed_without_protection(host, config()), host
        assert exposure_warning(host, config()) is None
    for host in ("[::]", "0.0.0.0", "", "192.168.1.5", "10.0.0.1", "example.com", "[2001:db8::1]"):
        assert not is_loopback(host), host
        assert exposed_without_protection(host, config())
        assert exposed_without_protection(host, config(**tls))  # anyone may call
        assert exposed_without_protection(host, config(auth_token_file="/x/t"))  # the token in clear text
        assert not exposed_without_protection(host, config(auth_token_file="/x/t", **tls))
        assert not exposed_without_protection(host, config(tls_client_ca="/x/ca.pem", **tls))
    warning = exposure_warning("0.0.0.0", config())
    assert "0.0.0.0" in warning and "without TLS" in warning and "without authentication" in warning
    assert "without TLS" not in exposure_warning("0.0.0.0", config(**tls))
