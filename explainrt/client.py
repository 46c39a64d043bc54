"""Python client of the explainrt gRPC server.

    from explainrt.client import ExplainClient
    with ExplainClient("localhost:50051") as client:
        result = client.explain("cat.jpg", method="sidu")
        result.saliency          # float32 (H, W) in [0, 1]
        for item in client.stream([{"image": "a.jpg", "method": "fem"}, {"image": "b.jpg", "method": "rise"}]):
            ...                  # RemoteExplanation, or RemoteError for an item that failed

Several replicas: ``ExplainClient("10.0.0.1:50051,10.0.0.2:50051")`` (or a list), or
``ExplainClient("dns:///explainrt.default.svc.cluster.local:50051")`` for every address a name
resolves to (a Kubernetes headless Service); ``result.replica`` names the server that answered.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from .api import FirstTargetView, target_indices
from .credentials import TOKEN_ENV, SecurityError, check_key_pair, check_token, is_loopback, read_pem
from .errors import ExplainRTError, InvalidInputError, require
from .proto import REPLICA_KEY, SERVICE_NAME  # wire constants, shared with the server (no protobuf import)

log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, bytes, np.ndarray]
PathLike = Union[str, os.PathLike]
MIB = 2**20


class RemoteError(ExplainRTError):
    """The server answered with an error status; ``code`` is the gRPC status name (e.g. 'INVALID_ARGUMENT')."""

    def __init__(self, code: str, message: str, index: Optional[int] = None, request_id: str = "",
                 replica: str = ""):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.index, self.request_id = code, message, index, request_id
        self.replica = replica  # the server that answered ("" when none did, e.g. unreachable)


@dataclasses.dataclass(repr=False)
class RemoteExplanation(FirstTargetView):
    """One explanation returned by the server (maps already decoded to NumPy)."""

    model: str
    method: str
    targets: list[int]
    labels: list[str]
    probabilities: list[float]  # of each target for the unmasked input
    saliency_maps: np.ndarray  # (T, H, W) float32 (or float16 if asked) in [0, 1]
    predictions: list[tuple[int, str, float]]  # top-k (class, label, probability)
    forward_passes: int
    timings: dict  # server-side seconds: queue_s, preprocess_s, base_pass_s, explain_s, postprocess_s, total_s
    params: dict
    original_size: Optional[tuple[int, int]] = None
    overlay_png: Optional[bytes] = None
    visualization: Optional[np.ndarray] = None
    request_id: str = ""
    index: int = 0
    latency_s: float = 0.0  # end to end, measured by the client
    replica: str = ""  # the server that answered (its --replica-name, by default HOSTNAME:PORT)

    @property
    def probability(self) -> float:
        return self.probabilities[0]

    def top_k(self, k: int = 5) -> list[tuple[int, float]]:
        """The k most probable classes as (class, probability), like ``Explanation.top_k``."""
        return [(c, p) for c, _label, p in self.predictions[:k]]


def _explanation(response, latency: float = 0.0, index: int = 0, replica: str = "") -> RemoteExplanation:
    from .proto.codec import tensor_to_array

    maps = np.stack([tensor_to_array(m.saliency, "saliency") for m in response.maps]) if response.maps else \
        np.zeros((0, 0, 0), np.float32)
    t = response.timings
    return RemoteExplanation(
        model=response.model, method=response.method, targets=[m.target for m in response.maps],
        labels=[m.label for m in response.maps], probabilities=[m.probability for m in response.maps],
        saliency_maps=maps, predictions=[(p.class_index, p.label, p.probability) for p in response.predictions],
        forward_passes=int(response.forward_passes),
        timings={"queue_s": t.queue_s, "preprocess_s": t.preprocess_s, "base_pass_s": t.base_pass_s,
                 "explain_s": t.explain_s, "postprocess_s": t.postprocess_s, "total_s": t.total_s},
        params={k: json.loads(v) for k, v in response.params.items()},
        original_size=tuple(response.original_size) if response.original_size else None,
        overlay_png=response.overlay_png or None,
        visualization=tensor_to_array(response.visualization, "visualization")
        if response.HasField("visualization") else None,
        request_id=response.request_id, index=index, latency_s=latency, replica=replica,
    )


class ExplainClient:
    """Client of an explainrt server at ``url`` ("host:port"), or of several replicas.

    ``url`` may name several servers, balanced with gRPC's ``round_robin`` policy: a list of
    "host:port" (or one string of them joined by commas; names are resolved once, here), or a
    ``dns:///name:port`` target, re-resolved by gRPC, whose every address is a replica (a
    Kubernetes headless Service). A balanced channel watches each replica's health service and
    sends nothing to one that is not SERVING (loading, draining), and gRPC retries a call
    answered UNAVAILABLE on another replica (up to ``retries`` + 1 attempts, at most 5). Every
    result says which replica answered (``RemoteExplanation.replica``, ``RemoteError.replica``).

    ``timeout``: seconds per call (None: no deadline); calls answered UNAVAILABLE (server
    starting, draining, unreachable) are retried ``retries`` times with exponential backoff
    from ``backoff`` seconds; a stream that breaks that way (or whose item is refused UNAVAILABLE)
    goes on from its first unanswered item on a new stream. ``max_message_mib`` bounds messages
    both ways.

    TLS: ``tls_ca`` (PEM file of the CA that signed the server's certificate) turns it on;
    ``tls=True`` alone trusts the system's root certificates. ``tls_cert``/``tls_key`` (PEM files)
    present a client certificate to a server that asks for one (mutual TLS). ``tls_server_name``
    checks the server's certificate against that name instead of the host in ``url``.
    ``token``: sent as ``authorization: Bearer <token>`` on every call (default: the
    ``EXPLAINRT_TOKEN`` environment variable, if set). A wrong or missing token raises
    ``RemoteError`` with code UNAUTHENTICATED (never retried).
    """

    def __init__(self, url: Union[str, Sequence[str]], timeout: Optional[float] = 60.0, retries: int = 3,
                 backoff: float = 0.1,
                 max_message_mib: int = 256, model: Optional[str] = None, *, tls: bool = False,
                 tls_ca: Optional[PathLike] = None, tls_cert: Optional[PathLike] = None,
                 tls_key: Optional[PathLike] = None, tls_server_name: Optional[str] = None,
                 token: Optional[str] = None):
        self.grpc = require("grpc", "serve", "the explainrt client")
        from .proto.explainrt.v1 import explainrt_pb2, explainrt_pb2_grpc

        self.pb = explainrt_pb2
        self.timeout, self.retries, self.backoff, self.model = timeout, int(retries), backoff, model
        self.target, hosts, self.balanced = channel_target(url)
        self.url = url if isinstance(url, str) else ",".join(url)
        options = [
            ("grpc.max_receive_message_length", max_message_mib * MIB),
            ("grpc.max_send_message_length", max_message_mib * MIB),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]
        if self.balanced:
            options += [("grpc.service_config", json.dumps(service_config(self.retries, backoff))),
                        ("grpc.service_config_disable_resolution", 1), ("grpc.enable_retries", 1)]
        credentials = _channel_credentials(self.grpc, tls, tls_ca, tls_cert, tls_key, tls_server_name)
        self.tls = credentials is not None
        if self.tls and len(hosts) > 1 and not tls_server_name:
            raise SecurityError(f"TLS over several addresses ({self.url}) needs tls_server_name / --tls-server-name: "
                                "the name the replicas' certificates carry")
        self._hint = _tls_hint(self.tls, bool(tls_cert))
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
            label = f"${TOKEN_ENV}"
        else:
            label = "the token"
        self._metadata = (("authorization", f"Bearer {check_token(token, label)}"),) if token is not None else None
        if self.tls:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self.channel = self.grpc.secure_channel(self.target, credentials, options=options)
        else:
            if token is not None and not self.target.startswith("unix:") and not all(map(is_loopback, hosts)):
                log.warning("sending the token to %s without TLS: anyone on the network can read it (pass tls_ca "
                            "/ --tls-ca for a server with TLS)", self.url)
            self.channel = self.grpc.insecure_channel(self.target, options=options)
        self.stub = explainrt_pb2_grpc.ExplainServiceStub(self.channel)

    # ---- requests ----------------------------------------------------------------------
    def request(self, image: ImageInput, method: str = "sidu", target: Union[None, int, Sequence[int]] = None,
                params: Optional[dict] = None, model: Optional[str] = None, saliency_dtype: str = "float32",
                original_size: bool = False, overlay: bool = False, top_k: Optional[int] = None,
                request_id: str = "", priority: int = 0):
        """Build an ``ExplainRequest`` (explain/stream arguments documented there)."""
        from .imaging import read_image_bytes
        from .proto.codec import array_to_tensor, dtype_code

        pb = self.pb
        if isinstance(priority, bool) or not isinstance(priority, (int, np.integer)) or not -10 <= priority <= 10:
            raise InvalidInputError(f"priority must be an int in -10..10 (higher runs first), got {priority!r}")
        req = pb.ExplainRequest(model=model or self.model or "", method=method, request_id=request_id,
                                priority=int(priority))
        if isinstance(image, (str, os.PathLike)):
            req.encoded = server_readable(read_image_bytes(image), os.fspath(image))
        elif isinstance(image, (bytes, bytearray, memoryview)):
            req.encoded = server_readable(bytes(image))
        elif isinstance(image, np.ndarray):
            if np.issubdtype(image.dtype, np.floating):
                req.tensor.CopyFrom(array_to_tensor(image, pb.FLOAT32))
            else:
                req.tensor.CopyFrom(array_to_tensor(image))
        else:
            raise InvalidInputError(f"unsupported image type {type(image).__name__}: pass a path, encoded bytes "
                                    "or a NumPy array (uint8 H×W×3, or preprocessed float32 3×H×W)")
        if target is not None:
            req.targets.extend(target_indices(target))
        if not isinstance(params or {}, dict):
            raise InvalidInputError(f"params must be a dict of method parameters, got {type(params).__name__}")
        for key, value in (params or {}).items():
            try:
                req.params[str(key)] = value if isinstance(value, str) else json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"parameter {key}={value!r} cannot be sent as JSON ({exc})") from None
        req.output.saliency_dtype = dtype_code(saliency_dtype)
        req.output.map_size = pb.MAP_SIZE_ORIGINAL if original_size else pb.MAP_SIZE_MODEL_INPUT
        req.output.overlay_png = bool(overlay)
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k < 2**31:
                raise InvalidInputError(f"top_k must be an int >= 0, got {top_k!r}")
            req.output.top_k = int(top_k)
        return req

    def explain(self, image: ImageInput, method: str = "sidu", target: Union[None, int, Sequence[int]] = None,
                params: Optional[dict] = None, model: Optional[str] = None, saliency_dtype: str = "float32",
                original_size: bool = False, overlay: bool = False, top_k: Optional[int] = None,
                timeout: Optional[float] = None, request_id: str = "", priority: int = 0) -> RemoteExplanation:
        """Explain one image on the server.

        ``image``: a file path (sent as encoded bytes), encoded bytes, a uint8 H×W×3 array, or a
        preprocessed float32 (3, H, W) array; files and bytes in formats other than PNG and JPEG
        (BMP, WebP, TIFF) are converted to PNG here, as the server takes only these two. ``params``
        are method parameters (values JSON-encoded unless already strings). ``original_size``: maps
        at the image's size instead of the model's; ``overlay``: also return a PNG overlay;
        ``top_k``: predictions (server default 5); ``priority`` (-10..10): higher runs first among
        the requests waiting on the server.
        """
        req = self.request(image, method, target, params, model, saliency_dtype, original_size, overlay, top_k,
                           request_id, priority)
        t0 = time.perf_counter()
        response, replica = self._unary(self.stub.Explain, req, timeout)
        return _explanation(response, time.perf_counter() - t0, replica=replica)

    def stream(self, requests: Iterable[Union[dict, Any]], progress: Optional[Callable[[int, int, int], None]] = None,
               timeout: Optional[float] = None) -> Iterator[Union[RemoteExplanation, RemoteError]]:
        """Explain many images on one stream; yields one result per request, in order.

        Each request is an ``ExplainRequest`` or a dict of ``request()`` arguments. A request that
        failed yields a ``RemoteError`` (the stream goes on). ``progress(index, done, total)`` is
        called for the server's progress messages. ``timeout`` bounds the whole stream (default: none).
        A stream that breaks with UNAVAILABLE (its server killed or unreachable), or whose item is
        refused UNAVAILABLE (its server draining), goes on from its first unanswered item on a new
        stream (``retries`` times, with backoff; on another replica when there are several).
        """
        source = enumerate(requests)
        lock = threading.Lock()  # between gRPC's thread reading ``messages`` and this one resuming
        sent: dict[int, float] = {}  # by index in ``requests``: when it was first sent
        refused: dict[int, RemoteError] = {}  # items that could not be built: never sent
        failure: list[BaseException] = []  # the caller's iterable raised: re-raised once the stream ends
        replay: list[tuple[int, Any]] = []  # (index, message) sent on a broken stream and never answered
        end = None if timeout is None else time.monotonic() + timeout

        def refused_before(index: float) -> Iterator[RemoteError]:
            with lock:
                errors = [refused.pop(i) for i in sorted(k for k in refused if k < index)]
            yield from errors

        for attempt in itertools.count():
            pending: dict[int, Any] = {}  # index -> message, sent on this stream, not answered yet
            client_index: list[int] = []  # this stream's item index -> index in ``requests``
            closed = [False]

            def messages(backlog=list(replay), pending=pending, client_index=client_index, closed=closed):
                for i, msg in backlog:
                    with lock:
                        if closed[0]:
                            return
                        pending[i] = msg
                        client_index.append(i)
                    yield msg
                while True:
                    with lock:
                        if closed[0]:
                            return
                        try:
                            i, item = next(source)
                        except StopIteration:
                            return
                        except Exception as exc:  # grpc would hide it behind "Exception iterating requests!"
                            failure.append(exc)
                            return
                        try:
                            msg = item if isinstance(item, self.pb.ExplainRequest) else self.request(**item)
                        except (ExplainRTError, TypeError, ValueError) as exc:
                            refused[i] = RemoteError("INVALID_ARGUMENT", f"request {i} was not sent: {exc}", i)
                            continue
                        sent[i] = time.perf_counter()
                        pending[i] = msg
                        client_index.append(i)
                    yield msg

            remaining = None if end is None else max(0.0, end - time.monotonic())
            call = self.stub.ExplainStream(messages(), timeout=remaining, metadata=self._metadata)
            replica = ""
            retry: Optional[RemoteError] = None
            try:
                for reply in call:
                    replica = replica or _replica(call.initial_metadata())
                    kind = reply.WhichOneof("kind")
                    index = client_index[reply.index]
                    if kind == "progress":
                        if progress is not None:
                            progress(index, int(reply.progress.done), int(reply.progress.total))
                        continue
                    if kind == "error" and reply.error.code_name == "UNAVAILABLE" and attempt < self.retries:
                        retry = RemoteError(reply.error.code_name, reply.error.message, index, reply.request_id,
                                            replica)
                        break
                    yield from refused_before(index)
                    with lock:
                        pending.pop(index, None)
                    latency = time.perf_counter() - sent.get(index, time.perf_counter())
                    if kind == "result":
                        yield _explanation(reply.result, latency, index, replica)
                    else:
                        yield RemoteError(reply.error.code_name, reply.error.message, index, reply.request_id,
                                          replica)
                else:
                    if failure:
                        raise failure[0]
                    yield from refused_before(float("inf"))
                    return
            except self.grpc.RpcError as exc:
                error = _remote_error(exc, self._hint, replica)
                if error.code != "UNAVAILABLE" or attempt >= self.retries:
                    raise error from None
                retry = error
            finally:
                call.cancel()
                with lock:
                    closed[0] = True
                    replay = sorted(pending.items())
            delay = self.backoff * (2 ** attempt)
            if end is not None and time.monotonic() + delay >= end:
                raise retry
            log.info("event=stream_resumed code=UNAVAILABLE attempt=%d unanswered=%d replica=%s delay_s=%.3f",
                     attempt + 1, len(replay), retry.replica or "-", delay)
            time.sleep(delay)

    # ---- models and health -------------------------------------------------------------
    def list_models(self) -> list[dict]:
        """The server's models: name, input_size, num_classes, backend, device."""
        response, _replica_name = self._unary(self.stub.ListModels, self.pb.ListModelsRequest(), None)
        return [{"name": m.name, "input_size": tuple(m.input_size), "num_classes": m.num_classes,
                 "backend": m.backend, "device": m.device} for m in response.models]

    def metadata(self, model: Optional[str] = None) -> dict:
        """A model's inputs, outputs, activation layer, labels and methods (with parameter defaults) as a dict."""
        from google.protobuf import json_format

        response, _replica_name = self._unary(self.stub.GetModelMetadata,
                                              self.pb.GetModelMetadataRequest(model=model or self.model or ""), None)
        out = json_format.MessageToDict(response, preserving_proto_field_name=True)
        out["methods"] = {m.name: {p.name: json.loads(p.default_json) for p in m.parameters}
                          for m in response.methods}
        return out

    def health(self, service: str = "") -> str:
        """The standard health check: 'SERVING', 'NOT_SERVING' or 'SERVICE_UNKNOWN' ("" = the whole server)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            response, _replica_name = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), None)
        except RemoteError as exc:
            if exc.code == "NOT_FOUND":
                return "SERVICE_UNKNOWN"
            raise
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 30.0, service: str = "") -> None:
        """Poll the health check until SERVING (balanced: one replica is); RemoteError UNAVAILABLE after ``timeout``."""
        end = time.monotonic() + timeout
        status = "UNREACHABLE"
        while time.monotonic() < end:
            try:
                status = self.health(service)
                if status == "SERVING":
                    return
            except RemoteError as exc:
                status = exc.code
            time.sleep(0.05)
        raise RemoteError("UNAVAILABLE", f"{self.url} is not SERVING after {timeout} s (last status {status})")

    # ---- plumbing ----------------------------------------------------------------------
    def _unary(self, method, request, timeout: Optional[float]) -> tuple[Any, str]:
        """(response, replica that answered), UNAVAILABLE retried ``retries`` times with backoff (over
        several replicas the channel's retry policy does that, on another replica: not again here)."""
        timeout = self.timeout if timeout is None else timeout
        retries = 0 if self.balanced else self.retries
        for attempt in range(retries + 1):
            try:
                response, call = method.with_call(request, timeout=timeout, metadata=self._metadata)
                return response, _replica(call.trailing_metadata())
            except self.grpc.RpcError as exc:
                if exc.code() == self.grpc.StatusCode.UNAVAILABLE and attempt < retries:
                    delay = self.backoff * (2 ** attempt)
                    log.info("event=retry code=UNAVAILABLE attempt=%d delay_s=%.3f", attempt + 1, delay)
                    time.sleep(delay)
                    continue
                raise _remote_error(exc, self._hint) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def server_readable(data: bytes, name: str = "image bytes") -> bytes:
    """``data`` as the server takes it: PNG and JPEG as they are; any other format OpenCV reads (BMP,
    WebP, TIFF, …) decoded here and sent as a lossless PNG, since the server checks an image's size
    from its PNG/JPEG header before decoding it. Not an image: the bytes unchanged (the server says why)."""
    from .imaging import decode_image, encode_png, peek_image_size

    if peek_image_size(data) is not None:
        return data
    try:
        return encode_png(decode_image(data, name))
    except InvalidInputError:
        return data


def _replica(metadata) -> str:
    """The replica named in a call's metadata ("" if none)."""
    return next((value for key, value in metadata or () if key == REPLICA_KEY), "")


def _remote_error(exc, hint: Callable[[str], str] = lambda details: "", replica: str = "") -> RemoteError:
    code = exc.code()
    details = exc.details() or str(exc)
    if code is not None and code.name == "UNAVAILABLE":
        details += hint(details)
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return RemoteError(code.name if code is not None else "UNKNOWN", details, replica=_replica(trailers) or replica)


def _tls_hint(tls: bool, client_cert: bool) -> Callable[[str], str]:
    """What to try when a connection failed: gRPC's reasons name TLS only half the time."""
    def hint(details: str) -> str:
        low = details.lower()
        if "hostname verification" in low:
            return (" (the server's certificate does not name the host of the URL: connect by a name it carries, "
                    "or pass tls_server_name / --tls-server-name)")
        if "certificate_verify_failed" in low:
            return " (the server's certificate is not signed by the CA given: check tls_ca / --tls-ca)"
        if "wrong_version_number" in low:
            return " (the server does not speak TLS: drop tls_ca / --tls-ca, or start it with --tls-cert/--tls-key)"
        if "socket closed" in low or "connection reset" in low:
            if not tls:
                return " (if the server uses TLS, pass tls_ca / --tls-ca)"
            if not client_cert:
                return " (if the server asks for client certificates, pass tls_cert/tls_key / --tls-cert/--tls-key)"
            return " (if the server asks for client certificates, was this one signed by its --tls-client-ca?)"
        return ""

    return hint


def _channel_credentials(grpc, tls: bool, ca, cert, key, server_name):
    """``grpc.ssl_channel_credentials`` from PEM files (checked), or None for a plaintext channel."""
    if bool(cert) != bool(key):
        given, missing = ("tls_cert", "tls_key") if cert else ("tls_key", "tls_cert")
        raise SecurityError(f"{given} (--{given.replace('_', '-')}) needs {missing} (--{missing.replace('_', '-')}) "
                            "as well: a client certificate goes with its private key")
    if not (tls or ca or cert):
        if server_name:
            raise SecurityError(f"tls_server_name {server_name!r} needs TLS: give tls_ca (--tls-ca) or tls=True "
                                "(--tls)")
        return None
    roots = read_pem(ca, "CA certificate", "--tls-ca") if ca else None
    chain = private_key = None
    if cert:
        chain = read_pem(cert, "client certificate", "--tls-cert")
        private_key = read_pem(key, "client key", "--tls-key", key=True)
        check_key_pair(cert, key, "client", ("--tls-cert", "--tls-key"))
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=private_key, certificate_chain=chain)


def _split_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" as (host, port), or InvalidInputError."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or (":" in host and not (
            host.startswith("[") and host.endswith("]"))):
        raise InvalidInputError(f"server address {address!r} is not HOST:PORT (an IPv6 address in brackets: "
                                "[::1]:50051)")
    return host.strip("[]"), int(port)


def channel_target(url: Union[str, Sequence[str]]) -> tuple[str, list[str], bool]:
    """The gRPC target for ``url``, the hosts it names, and whether it balances over several servers.

    One "host:port" stays as it is (one server). Several (a list, or joined by commas) become a
    static ``ipv4:``/``ipv6:`` list (names are resolved now). A ``dns:`` target is passed to gRPC,
    which resolves it (and again when a connection drops) and balances over every address.
    """
    if isinstance(url, str):
        text = url.strip()
        if text.startswith("dns:"):
            authority = text[4:].lstrip("/").rsplit("/", 1)[-1]  # dns:[//authority/]host:port
            return text, [_split_address(authority)[0]], True
        if text.startswith(("unix:", "ipv4:", "ipv6:")) or "," not in text:
            if not text:
                raise InvalidInputError("the server address is empty: give HOST:PORT")
            if text.startswith(("ipv4:", "ipv6:")):
                hosts = [_split_address(a)[0] for a in text[5:].split(",")]
                return text, hosts, len(hosts) > 1
            return text, ([] if text.startswith("unix:") else [_split_address(text)[0]]), False
        addresses = [a for a in (part.strip() for part in text.split(",")) if a]
    else:
        addresses = [str(a).strip() for a in url]
    if not addresses:
        raise InvalidInputError("no server address given: give HOST:PORT (or several, joined by commas)")
    if len(addresses) == 1:
        return channel_target(addresses[0])
    resolved: dict[int, list[str]] = {socket.AF_INET: [], socket.AF_INET6: []}
    hosts = []
    for address in addresses:
        host, port = _split_address(address)
        hosts.append(host)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise InvalidInputError(f"cannot resolve server {host!r} ({exc.strerror})") from None
        first: dict[int, str] = {}  # the first address of each family
        for family, _type, _proto, _name, sockaddr in infos:
            if family in resolved:
                first.setdefault(family, sockaddr[0])
        for family, ip in first.items():
            resolved[family].append(f"{ip}:{port}" if family == socket.AF_INET else f"[{ip}]:{port}")
    for family, scheme in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        if len(resolved[family]) == len(addresses):  # every server reachable in one address family
            return f"{scheme}:" + ",".join(dict.fromkeys(resolved[family])), hosts, True
    raise InvalidInputError(f"the servers {', '.join(addresses)} mix IPv4 and IPv6 addresses: give addresses of "
                            "one family")


def service_config(retries: int, backoff: float) -> dict:
    """gRPC service config of a balanced channel: round_robin over healthy replicas, UNAVAILABLE retried."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
    if retries > 0:
        config["methodConfig"] = [{"name": [{"service": SERVICE_NAME}], "retryPolicy": {
            "maxAttempts": min(retries + 1, 5), "initialBackoff": f"{max(backoff, 0.001):.3f}s",
            "maxBackoff": f"{max(backoff, 0.001) * 16:.3f}s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"]}}]
    return config
