"""The gRPC server: ExplainService + grpc.health.v1 + reflection, metrics over HTTP, graceful shutdown."""
from __future__ import annotations

import concurrent.futures
import logging
import select
import signal
import socket
import threading
import time
from typing import Optional

from ..errors import ExplainRTError, require
from .config import MIB, ServerConfig
from .logs import log_event
from .metrics import ServerMetrics
from .models import ModelRepository
from .scheduler import Scheduler
from .service import ExplainServicer, ServiceOptions
from .tasks import RequestLimits

log = logging.getLogger(__name__)

SERVICE_NAME = "explainrt.v1.ExplainService"
DRAIN_SEND_S = 5.0  # once no explanation is running: time left for the last responses to be sent
DRAIN_QUIET_S = 0.5  # ...and first, until clients stop sending new requests for this long (at most:)
DRAIN_LINGER_S = 5.0


class ServeError(ExplainRTError):
    """The server could not start (a port in use, an address not of this machine)."""


class ExplainServer:
    """One explainrt server: ``start()``, then ``wait()`` or ``stop()``.

    Health reports NOT_SERVING (overall "" and per model) while models load and once shutdown
    begins, SERVING in between. ``stop(grace)`` refuses new requests with UNAVAILABLE, lets
    in-flight ones finish for up to ``grace`` seconds, then cancels what is left.
    """

    def __init__(self, config: ServerConfig):
        self.grpc = require("grpc", "serve", "the gRPC server")
        self._health_mod = require("grpc_health.v1.health", "serve", "the gRPC health service")
        self._health_pb2 = require("grpc_health.v1.health_pb2", "serve", "the gRPC health service")
        self._health_grpc = require("grpc_health.v1.health_pb2_grpc", "serve", "the gRPC health service")
        self._reflection = require("grpc_reflection.v1alpha.reflection", "serve", "gRPC server reflection")
        self.config = config
        self.models = ModelRepository(config.models, batch_size=config.batch_size, **config.engine_options())
        self.scheduler = Scheduler(config.workers, config.queue_size)
        self.metrics = ServerMetrics(lambda: self.scheduler.depth, lambda: self.scheduler.running)
        self.servicer = ExplainServicer(self.models, self.scheduler, self.metrics, ServiceOptions(
            max_response_bytes=config.max_send_mib * MIB, progress_interval_s=config.progress_interval_s,
            stream_window=config.workers,
            limits=RequestLimits(config.max_masks, config.max_targets, config.max_pixels)))
        # Blocking Watch (one RPC thread per watcher): the library's non-blocking mode sends to
        # watchers under its lock, which deadlocks when a watcher disconnects during a status change
        # (grpc/grpc#43403 reworks that lock).
        self.health = self._health_mod.HealthServicer(experimental_non_blocking=False)
        # Every queued request holds an RPC thread while it waits; 32 spare for streams, metadata, rejections.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.queue_size + config.workers + 32, thread_name_prefix="explainrt-rpc")
        self._server = None
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopping = False

    def start(self, load: bool = True) -> "ExplainServer":
        """Bind and start serving (health NOT_SERVING), then load the models (health SERVING) when ``load``."""
        grpc = self.grpc
        server = grpc.server(self._executor, options=self.config.grpc_options())
        from ..proto.explainrt.v1 import explainrt_pb2, explainrt_pb2_grpc

        explainrt_pb2_grpc.add_ExplainServiceServicer_to_server(self.servicer, server)
        self._health_grpc.add_HealthServicer_to_server(self.health, server)
        names = (explainrt_pb2.DESCRIPTOR.services_by_name["ExplainService"].full_name,
                 self._health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 self._reflection.SERVICE_NAME)
        self._reflection.enable_server_reflection(names, server)
        address = f"{self.config.host}:{self.config.port}"
        try:
            self.port = server.add_insecure_port(address)  # 0 on failure, or (newer grpcio) RuntimeError
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise ServeError(f"could not listen on {address}: is another server on that port, or is the host "
                             "not an address of this machine?")
        self._set_health(serving=False)
        server.start()
        self._server = server
        if self.config.metrics_port is not None:
            host = "0.0.0.0" if self.config.host in ("[::]", "0.0.0.0") else self.config.host.strip("[]")
            try:
                self.metrics_port = self.metrics.start_http(self.config.metrics_port, host)
            except OSError as exc:
                server.stop(0)
                raise ServeError(f"could not serve metrics on {host}:{self.config.metrics_port}: {exc.strerror or exc}") \
                    from None
        log_event(log, "listening", host=self.config.host, port=self.port, metrics_port=self.metrics_port,
                  workers=self.config.workers, queue_size=self.config.queue_size, batch_size=self.config.batch_size)
        if load:
            self.load_models()
        return self

    def load_models(self) -> list[str]:
        """Load every model of the directory and report SERVING."""
        t0 = time.perf_counter()
        names = self.models.load_all()
        self._set_health(serving=True)
        log_event(log, "serving", models=",".join(names), seconds=round(time.perf_counter() - t0, 3))
        return names

    def _set_health(self, serving: bool) -> None:
        status = self._health_pb2.HealthCheckResponse.SERVING if serving else \
            self._health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME, *self.models.names()):
            self.health.set(name, status)

    def stop(self, grace: Optional[float] = None) -> None:
        """Drain: NOT_SERVING, new requests UNAVAILABLE, in-flight ones get ``grace`` seconds, then stop everything."""
        with self._stop_lock:
            if self._stopping:
                self._stopped.wait()
                return
            self._stopping = True
        grace = self.config.grace_s if grace is None else grace
        t0 = time.perf_counter()
        end = time.monotonic() + grace
        log_event(log, "draining", grace_s=grace, queued=self.scheduler.depth, running=self.scheduler.running)
        # The gRPC server keeps accepting calls while explanations drain, so that health checks read
        # NOT_SERVING and new requests get UNAVAILABLE from the servicer (a stopped gRPC server would
        # answer CANCELLED).
        self.health.enter_graceful_shutdown()
        self.scheduler.close()
        while self.servicer.active_calls and time.monotonic() < end:
            time.sleep(0.02)
        # Keep refusing with UNAVAILABLE while clients are still sending: a call that reaches a
        # stopping gRPC server is CANCELLED instead (or hangs until its deadline), and clients
        # rightly do not retry those elsewhere.
        drained = time.monotonic()
        linger_end = min(end, drained + DRAIN_LINGER_S)
        while time.monotonic() < linger_end and (self.servicer.active_calls or time.monotonic() - max(
                drained, self.servicer.last_call_at) < DRAIN_QUIET_S):
            time.sleep(0.02)
        if self._server is not None:
            # Then: let responses still being sent go out (a few seconds at most), cancel whatever is
            # left (streams kept open, health watches; cancel events stop workers between two chunks).
            self._server.stop(min(max(0.0, end - time.monotonic()), DRAIN_SEND_S)).wait()
        self.scheduler.shutdown(timeout=max(0.0, end - time.monotonic()) + 5.0)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.metrics.stop_http()
        self.models.close()
        log_event(log, "stopped", seconds=round(time.perf_counter() - t0, 3))
        self._stopped.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the server has stopped; True if it did within ``timeout``."""
        return self._stopped.wait(timeout)

    def wait_for_signals(self) -> None:
        """Block (on the main thread) until the server has stopped, reacting to signals at once.

        A signal that the OS delivers to another thread runs its Python handler only once the main
        thread executes bytecode again; the wake-up socket makes the main thread's ``select``
        return right away instead of at its next timeout.
        """
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        try:
            while not self._stopped.is_set():
                if select.select([reader], [], [], 1.0)[0]:
                    reader.recv(64)
        finally:
            signal.set_wakeup_fd(previous)
            reader.close()
            writer.close()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a graceful stop (on a thread: a handler must return quickly)."""
        def handle(signum, _frame):
            log_event(log, "signal", signal=signal.Signals(signum).name)
            threading.Thread(target=self.stop, name="explainrt-shutdown", daemon=True).start()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop(grace=0)
