"""The gRPC server: ExplainService + grpc.health.v1 + reflection, metrics over HTTP, graceful shutdown."""
from __future__ import annotations

import asyncio
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
from .service import SERVICE_NAME, ExplainServicer, ServiceOptions
from .tasks import RequestLimits

log = logging.getLogger(__name__)

RPC_HEADROOM = 256  # RPCs beyond --max-calls explain calls that the transport still takes (health, metadata)
DRAIN_SEND_S = 5.0  # once no explanation is running: time left for the last responses to be sent
DRAIN_QUIET_S = 0.5  # ...and first, until clients stop sending new requests for this long (at most:)
DRAIN_LINGER_S = 5.0


class ServeError(ExplainRTError):
    """The server could not start (a port in use, an address not of this machine)."""


class ExplainServer:
    """One explainrt server: ``start()``, then ``wait()`` or ``stop()``.

    The gRPC server is a ``grpc.aio`` server on an event loop of its own thread; explanations
    run on the scheduler's worker threads. Health reports NOT_SERVING (overall "" and per model)
    while models load and once shutdown begins, SERVING in between. ``stop(grace)`` refuses new
    requests with UNAVAILABLE, lets in-flight ones finish for up to ``grace`` seconds, then
    cancels what is left.
    """

    def __init__(self, config: ServerConfig):
        self.grpc = require("grpc", "serve", "the gRPC server")
        self._health_mod = require("grpc_health.v1.health", "serve", "the gRPC health service")
        self._health_pb2 = require("grpc_health.v1.health_pb2", "serve", "the gRPC health service")
        self._health_grpc = require("grpc_health.v1.health_pb2_grpc", "serve", "the gRPC health service")
        self._reflection = require("grpc_reflection.v1alpha.reflection", "serve", "gRPC server reflection")
        from . import security

        self._security = security
        self.config = config
        self.credentials = security.server_credentials(config)  # bad TLS files fail here, before binding
        self._interceptors = security.interceptors(config)
        self.metrics = ServerMetrics(lambda: self.scheduler.depth, lambda: self.scheduler.running)
        delay = None if config.max_queue_delay_ms is None else config.max_queue_delay_ms / 1e3
        self.models = ModelRepository(config.models, batch_size=config.batch_size, max_queue_delay_s=delay,
                                      on_batch=self.metrics.observe_batch, bulk_nice=config.bulk_nice,
                                      **config.engine_options())
        self.scheduler = Scheduler(config.workers, config.queue_size, cheap_passes=config.cheap_passes,
                                   cheap_workers=config.cheap_workers,
                                   on_dequeue=lambda job, seconds: self.metrics.observe_queue_wait(job.method, seconds),
                                   memory_budget=config.memory_budget_mib * MIB)
        self.servicer = ExplainServicer(self.models, self.scheduler, self.metrics, ServiceOptions(
            max_response_bytes=config.max_send_mib * MIB, progress_interval_s=config.progress_interval_s,
            stream_window=config.workers + config.cheap_workers, max_calls=config.max_calls,
            limits=RequestLimits(config.max_masks, config.max_targets, config.max_pixels,
                                 max_response_bytes=config.max_send_mib * MIB)))
        self.health = None  # the aio health servicer, made on the event loop
        self._server = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopping = False

    # ---- the event loop ----------------------------------------------------------------------
    def _call(self, coroutine, timeout: Optional[float] = 30.0):
        """Run ``coroutine`` on the server's event loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _start_grpc(self) -> int:
        grpc = self.grpc
        from ..proto.explainrt.v1 import explainrt_pb2

        self.servicer.loop = asyncio.get_running_loop()
        # Explain calls are capped by the servicer (--max-calls, RESOURCE_EXHAUSTED with a reason);
        # the transport cap sits above it so health and metadata RPCs always find room.
        server = grpc.aio.server(options=self.config.grpc_options(), interceptors=self._interceptors,
                                 maximum_concurrent_rpcs=self.config.max_calls + RPC_HEADROOM)
        server.add_generic_rpc_handlers((self.servicer.handler(),))
        self.health = self._health_mod.aio.HealthServicer()
        self._health_grpc.add_HealthServicer_to_server(self.health, server)
        names = (explainrt_pb2.DESCRIPTOR.services_by_name["ExplainService"].full_name,
                 self._health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 self._reflection.SERVICE_NAME)
        self._reflection.enable_server_reflection(names, server)
        address = f"{self.config.host}:{self.config.port}"
        try:
            port = (server.add_secure_port(address, self.credentials) if self.credentials is not None
                    else server.add_insecure_port(address))
        except RuntimeError:
            port = 0
        if not port:
            raise ServeError(f"could not listen on {address}: is another server on that port, or is the host "
                             "not an address of this machine?")
        self.servicer.options.replica = self.config.replica_name or f"{socket.gethostname()}:{port}"
        await self._set_health_async(serving=False)
        await server.start()
        self._server = server
        return port

    def start(self, load: bool = True) -> "ExplainServer":
        """Bind and start serving (health NOT_SERVING), then load the models (health SERVING) when ``load``."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, args=(self._loop,), name="explainrt-grpc",
                                        daemon=True)
        self._thread.start()
        try:
            self.port = self._call(self._start_grpc())
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            raise
        if self.config.metrics_port is not None:
            host = "0.0.0.0" if self.config.host in ("[::]", "0.0.0.0") else self.config.host.strip("[]")
            try:
                self.metrics_port = self.metrics.start_http(self.config.metrics_port, host)
            except OSError as exc:
                self._shutdown_loop(0)
                raise ServeError(f"could not serve metrics on {host}:{self.config.metrics_port}: {exc.strerror or exc}") \
                    from None
        warning = self._security.exposure_warning(self.config.host, self.config)
        if warning:
            log_event(log, "exposed", logging.WARNING, warning=warning)
        log_event(log, "listening", host=self.config.host, port=self.port, metrics_port=self.metrics_port,
                  replica=self.servicer.options.replica, security=self._security.security_summary(self.config),
                  workers=self.config.workers, queue_size=self.config.queue_size, batch_size=self.config.batch_size,
                  max_queue_delay_ms=self.config.max_queue_delay_ms)
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

    async def _set_health_async(self, serving: bool) -> None:
        status = self._health_pb2.HealthCheckResponse.SERVING if serving else \
            self._health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME, *self.models.names()):
            await self.health.set(name, status)

    def _set_health(self, serving: bool) -> None:
        self._call(self._set_health_async(serving))

    def _shutdown_loop(self, grace: float) -> None:
        """Stop the gRPC server (``grace`` seconds for responses still being sent) and its event loop."""
        if self._server is not None:
            try:
                self._call(self._server.stop(grace), timeout=grace + 10)
            except Exception as exc:  # noqa: BLE001 (stopping must go on)
                log_event(log, "grpc_stop_failed", logging.WARNING, error=str(exc))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

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
        if self._server is not None:
            self._call(self.health.enter_graceful_shutdown())
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
        # Then: let responses still being sent go out (a few seconds at most), cancel whatever is
        # left (streams kept open, health watches; cancel events stop workers between two chunks).
        self._shutdown_loop(min(max(0.0, end - time.monotonic()), DRAIN_SEND_S))
        self.scheduler.shutdown(timeout=max(0.0, end - time.monotonic()) + 5.0)
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
