"""The real server with TLS, mutual TLS and a token: ExplainClient and `explainrt client` end to end."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from explainrt.cli import main
from explainrt.client import ExplainClient, RemoteError
from explainrt.credentials import SecurityError
from explainrt.proto.explainrt.v1 import explainrt_pb2 as pb
from explainrt.proto.explainrt.v1 import explainrt_pb2_grpc as pb_grpc
from security_helpers import TOKEN, pki, token_file, write_token  # noqa: F401 - fixtures
from serve_helpers import INPUT_HW, start_server



@pytest.fixture(scope="module")
def secure_server(single_model_dir, pki, token_file):
    """Mutual TLS and a token: everything at once."""
    srv = start_server(single_model_dir, metrics_port=None, tls_cert=pki.server_cert, tls_key=pki.server_key,
                       tls_client_ca=pki.ca, auth_token_file=token_file)
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def tls_server(single_model_dir, pki):
    srv = start_server(single_model_dir, metrics_port=None, tls_cert=pki.server_cert, tls_key=pki.server_key)
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def token_server(single_model_dir, token_file):
    srv = start_server(single_model_dir, metrics_port=None, auth_token_file=token_file)
    yield srv
    srv.stop(grace=0)


def _client(server, pki=None, mutual=False, **kwargs) -> ExplainClient:
    tls = {} if pki is None else dict(tls_ca=pki.ca, **(dict(tls_cert=pki.client_cert, tls_key=pki.client_key)
                                                         if mutual else {}))
    return ExplainClient(f"127.0.0.1:{server.port}", timeout=30, retries=0, **tls, **kwargs)


def test_tls_explain_and_stream_with_the_right_ca(tls_server, pki, image):
    with _client(tls_server, pki) as client:
        result = client.explain(image, "fem")
        assert result.saliency_maps.shape == (1, *INPUT_HW) and np.isfinite(result.saliency_maps).all()
        items = list(client.stream([{"image": image, "method": "fem"}, {"image": image, "method": "sidu"}]))
        assert [type(item).__name__ for item in items] == ["RemoteExplanation", "RemoteExplanation"]
        np.testing.assert_allclose(items[0].saliency_maps, result.saliency_maps, atol=1e-6)


def test_tls_wrong_ca_and_plaintext_fail(tls_server, pki, image):
    with ExplainClient(f"127.0.0.1:{tls_server.port}", timeout=30, retries=0, tls_ca=pki.other_ca) as client:
        with pytest.raises(RemoteError) as err:
            client.explain(image, "fem")
        assert err.value.code == "UNAVAILABLE" and "CERTIFICATE_VERIFY_FAILED" in err.value.message
    with _client(tls_server) as client:
        with pytest.raises(RemoteError) as err:
            client.explain(image, "fem")
        assert err.value.code == "UNAVAILABLE" and "--tls-ca" in err.value.message


def test_mutual_tls_and_token_on_every_rpc(secure_server, pki, image):
    with _client(secure_server, pki, mutual=True, token=TOKEN) as client:
        assert client.explain(image, "fem").model == "tiny"
        assert [item.method for item in client.stream([{"image": image, "method": "fem"}])] == ["fem"]
        assert [m["name"] for m in client.list_models()] == ["tiny"]
        assert client.metadata("tiny")["name"] == "tiny"
        assert client.health() == "SERVING"
    with _client(secure_server, pki, mutual=False, token=TOKEN) as client:  # no client certificate
        with pytest.raises(RemoteError) as err:
            client.explain(image, "fem")
        assert err.value.code == "UNAVAILABLE"


@pytest.mark.parametrize("token,reason", [(None, "missing token"), ("wrong-token", "wrong token")])
def test_wrong_or_missing_token_is_unauthenticated_on_unary_and_stream(token_server, image, token, reason,
                                                                      monkeypatch):
    monkeypatch.delenv("EXPLAINRT_TOKEN", raising=False)
    with _client(token_server, token=token) as client:
        for call in (lambda: client.explain(image, "fem"), lambda: list(client.stream([{"image": image}])),
                     client.list_models, lambda: client.metadata("tiny")):
            with pytest.raises(RemoteError) as err:
                call()
            assert err.value.code == "UNAUTHENTICATED" and err.value.message.startswith(reason)
        assert client.health() == "SERVING" and client.health("tiny") == "SERVING"  # health needs no token
    assert token_server.scheduler.running == 0 and token_server.scheduler.depth == 0


def test_token_from_explainrt_token(token_server, image, monkeypatch):
    monkeypatch.setenv("EXPLAINRT_TOKEN", TOKEN)
    with _client(token_server) as client:
        assert client.explain(image, "fem").method == "fem"


def test_reflection_needs_the_token_too(token_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = list(stub.ServerReflectionInfo(iter([request]), timeout=10,
                                                 metadata=[("authorization", f"Bearer {TOKEN}")]))
        names = {s.name for s in replies[0].list_services_response.service}
        assert "explainrt.v1.ExplainService" in names
        raw = pb_grpc.ExplainServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            raw.ListModels(pb.ListModelsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_cli_client_against_the_secure_server(secure_server, pki, token_file, png_path, tmp_path, capsys,
                                              monkeypatch):
    monkeypatch.delenv("EXPLAINRT_TOKEN", raising=False)
    base = ["client", png_path, "--url", f"127.0.0.1:{secure_server.port}", "--method", "fem", "--no-progress",
            "-o", str(tmp_path / "out"), "--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key",
            pki.client_key]
    assert main(base + ["--token-file", token_file]) == 0
    assert "fem: 1 forward passes" in capsys.readouterr().out
    assert (tmp_path / "out" / "picture.fem.npy").exists()
    assert main(base) == 2
    assert "UNAUTHENTICATED: missing token" in capsys.readouterr().err
    wrong = write_token(tmp_path / "wrong", "not-the-token")
    assert main(base + ["--token-file", wrong]) == 2
    assert "UNAUTHENTICATED: wrong token" in capsys.readouterr().err


def test_server_refuses_bad_security_settings(single_model_dir, pki, tmp_path):
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    for overrides, message in ((dict(tls_cert=pki.server_cert), "needs --tls-key"),
                               (dict(tls_cert=pki.server_cert, tls_key=pki.client_key), "does not belong"),
                               (dict(tls_client_ca=pki.ca), "needs TLS"),
                               (dict(auth_token_file=str(empty)), "is empty")):
        with pytest.raises(SecurityError, match=message):
            start_server(single_model_dir, metrics_port=None, load=False, **overrides)



def test_explainrt_serve_with_tls_and_a_token(single_model_dir, pki, token_file, image, monkeypatch):
    monkeypatch.delenv("EXPLAINRT_TOKEN", raising=False)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "explainrt", "serve", "--models", single_model_dir, "--port", "0", "--workers", "1",
         "--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-client-ca", pki.ca,
         "--auth-token-file", token_file], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        listening = proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(TLS \(mutual, client CA ca\.pem\), token auth", listening)
        assert match, f"unexpected first line {listening!r}; stderr: {proc.stderr.read() if proc.poll() else ''}"
        assert "serving tiny" in proc.stdout.readline()
        url = f"127.0.0.1:{match.group(1)}"
        tls = dict(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        with ExplainClient(url, timeout=30, retries=0, token=TOKEN, **tls) as client:
            assert client.explain(image, "fem").model == "tiny"
        with ExplainClient(url, timeout=30, retries=0, **tls) as client:
            with pytest.raises(RemoteError, match="UNAUTHENTICATED: missing token"):
                client.explain(image, "fem")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = proc.stderr.read()
    assert "event=unauthenticated method=/explainrt.v1.ExplainService/Explain reason=missing" in log
    assert "reachable from other machines" not in log  # loopback: no exposure warning
