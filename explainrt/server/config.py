"""Server settings (a light module: the CLI reads the defaults without importing grpc)."""
from __future__ import annotations

import dataclasses
from typing import Optional

MIB = 2**20


@dataclasses.dataclass
class ServerConfig:
    """Everything ``explainrt serve`` can set; the defaults are written here once."""

    models: str
    host: str = "127.0.0.1"  # loopback unless told otherwise ("[::]" / "0.0.0.0": every interface)
    port: int = 50051  # 0: any free port (see ExplainServer.port)
    metrics_port: Optional[int] = None  # None: no metrics endpoint; 0: any free port
    workers: int = 2  # expensive explanations running at once
    cheap_workers: int = 4  # threads beyond those for cheap requests (at most cheap_passes passes), e.g. FEM
    queue_size: int = 64  # requests waiting for a worker before RESOURCE_EXHAUSTED
    batch_size: int = 64  # masked images per engine call
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: Optional[int] = None  # ONNX Runtime intra-op threads (None: its default)
    # ONNX Runtime's intra-op threads busy-wait after each run by default. In a server they steal
    # the cores the RPC, worker and client threads need: on 2 cores, FEM on EfficientNet-Lite0
    # went from 17 to 10 ms end to end (p50) with spinning off.
    ort_spinning: bool = False
    # A 4K (3840x2160) PNG or raw uint8 RGB image is ~25 MB: 64 MiB leaves room for either.
    max_receive_mib: int = 64
    # Responses hold float maps (4K float32 is ~33 MB per target) and PNG overlays.
    max_send_mib: int = 256
    max_masks: int = 20000  # largest RISE n_masks one request may ask for
    max_targets: int = 16  # classes one request may explain
    max_pixels: int = 64_000_000  # largest decoded image
    grace_s: float = 30.0  # SIGTERM: time for in-flight requests to finish
    # This server's name in the "explainrt-replica" metadata of its answers (None: hostname:port,
    # i.e. the pod's name on Kubernetes), so that a client balancing over replicas can say which answered.
    replica_name: Optional[str] = None
    progress_interval_s: float = 0.5
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    # Close each client connection after this many seconds (its calls still finish): clients that
    # balance over a DNS name reconnect and re-resolve it, so replicas added by an autoscaler get
    # traffic. None: connections live as long as the clients keep them.
    max_connection_age_s: Optional[float] = None
    # Security: TLS (PEM files; a client CA makes it mutual TLS) and a bearer token checked on every
    # RPC but the health service.
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    auth_token_file: Optional[str] = None
    # Memory: what every request in flight may hold together (decoded image, buffers, response).
    memory_budget_mib: int = 4096
    # Explain calls (unary + streams) open at once; more get RESOURCE_EXHAUSTED. Health and
    # metadata RPCs are never counted against it.
    max_calls: int = 1024
    # Cross-request batching: engine calls of concurrent requests for one model that arrive within
    # this window share one engine batch (0: only what is already waiting; None: batching off).
    max_queue_delay_ms: Optional[float] = 2.0
    # Requests whose cost is at most this many forward passes are "cheap": they go first (shortest
    # expected first, with aging) and have the cheap_workers threads to themselves.
    cheap_passes: int = 8
    # With batching on CPU, cheap requests' engine calls run on an ONNX Runtime session of their
    # own; the main session's threads run this much nicer (Linux per-thread priority), so that a
    # one-image run still gets a core while a 64-image chunk keeps every core busy. 0: off.
    bulk_nice: int = 10

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel arguments: message limits, keepalive (client pings every >= 10 s allowed), connection age."""
        age = [] if self.max_connection_age_s is None else [("grpc.max_connection_age_ms",
                                                             max(1, int(self.max_connection_age_s * 1000)))]
        return age + [
            ("grpc.max_receive_message_length", self.max_receive_mib * MIB),
            ("grpc.max_send_message_length", self.max_send_mib * MIB),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),
        ]

    def engine_options(self) -> dict:
        """Keyword arguments for the models' engines (``Explainer(..., **options)``)."""
        options = {"backend": self.backend, "device": self.device}
        if self.threads:
            options["threads"] = self.threads
        if self.backend == "onnxruntime" and not self.ort_spinning:
            options["session_config"] = {"session.intra_op.allow_spinning": "0",
                                         "session.inter_op.allow_spinning": "0"}
        return options
