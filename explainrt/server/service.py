"""The ExplainService servicer: parse and validate, hand to the scheduler, map errors to status codes."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import queue
import threading
import time
from typing import Optional

import grpc

from ..errors import ExplainRTError, InvalidInputError, MissingDependencyError, ModelError
from ..explainers import METHODS
from ..explainers.driver import Cancelled
from ..proto.explainrt.v1 import explainrt_pb2 as pb
from ..proto.explainrt.v1 import explainrt_pb2_grpc as pb_grpc
from .logs import log_event
from .metrics import ServerMetrics
from .models import ModelNotFound, ModelRepository
from .scheduler import DeadlineExceeded, Job, QueueFull, Scheduler, ShuttingDown
from .tasks import ExplainTask, RequestLimits, ResponseTooLarge, describe, parse_request, run_task

log = logging.getLogger(__name__)


class NotReady(ExplainRTError):
    """The server is still loading its models (→ UNAVAILABLE)."""


def status_for(exc: BaseException, expired: bool = False) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an error raised while serving a request.

    ``expired``: the request's deadline has passed (a cancellation then reads DEADLINE_EXCEEDED).
    INTERNAL is kept for errors explainrt did not raise on purpose, i.e. bugs.
    """
    code = grpc.StatusCode
    if isinstance(exc, InvalidInputError):
        return code.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ModelNotFound):
        return code.NOT_FOUND, str(exc)
    if isinstance(exc, (QueueFull, ResponseTooLarge)):
        return code.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (ShuttingDown, NotReady)):
        return code.UNAVAILABLE, str(exc)
    if isinstance(exc, DeadlineExceeded) or (isinstance(exc, Cancelled) and expired):
        return code.DEADLINE_EXCEEDED, str(exc) if isinstance(exc, DeadlineExceeded) else (
            f"the deadline passed before the explanation finished ({exc}); give the call a longer deadline, "
            "or ask for less work (fewer masks, a smaller image)")
    if isinstance(exc, Cancelled):
        return code.CANCELLED, str(exc)
    if isinstance(exc, (ModelError, MissingDependencyError)):
        return code.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, MemoryError):
        return code.RESOURCE_EXHAUSTED, "the server ran out of memory for this request; ask for less work (fewer masks)"
    return code.INTERNAL, (f"internal error ({type(exc).__name__}: {exc}); this is a bug in explainrt, "
                           "the server log has the traceback")


@dataclasses.dataclass
class ServiceOptions:
    """Knobs of the servicer (the server's config passes them through)."""

    max_response_bytes: Optional[int] = None
    progress_interval_s: float = 0.5  # min seconds between two progress messages of one stream item
    stream_window: int = 4  # items of one stream in flight (queued or running) at a time
    limits: RequestLimits = dataclasses.field(default_factory=RequestLimits)


class _Item:
    """One request in flight: its task, job, timing and (for streams) its outgoing events."""

    def __init__(self, rpc: str, request: pb.ExplainRequest, index: int = 0):
        self.rpc, self.request, self.index = rpc, request, index
        self.request_id = request.request_id
        self.method = request.method
        self.arrival = time.perf_counter()
        self.task: Optional[ExplainTask] = None
        self.job: Optional[Job] = None
        self.events: "queue.Queue[tuple]" = queue.Queue()


class _Stream:
    """Items of one ExplainStream call: in request order, at most ``window`` queued or running at once."""

    def __init__(self, window: int):
        self.items: "queue.Queue[Optional[_Item]]" = queue.Queue()
        self._window = threading.BoundedSemaphore(max(1, window))
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._jobs: set = set()

    def reserve(self) -> bool:
        """Wait for a free slot in the window; False once the stream is cancelled."""
        while not self._window.acquire(timeout=0.1):
            if self._closed.is_set():
                return False
        return not self._closed.is_set()

    def start(self, item: _Item) -> None:
        self.items.put(item)

    def track(self, item: _Item) -> None:
        with self._lock:
            self._jobs.add(item.job)
        if self._closed.is_set():
            item.job.cancel.set()

    def finished(self, item: _Item) -> None:
        with self._lock:
            self._jobs.discard(item.job)
        self._window.release()

    def cancel(self) -> None:
        """The call ended (client cancel, deadline, error): stop every job of the stream."""
        self._closed.set()
        with self._lock:
            for job in self._jobs:
                job.cancel.set()


class ExplainServicer(pb_grpc.ExplainServiceServicer):
    """Thin gRPC layer over the model repository and the scheduler."""

    def __init__(self, models: ModelRepository, scheduler: Scheduler, metrics: ServerMetrics,
                 options: Optional[ServiceOptions] = None):
        self.models = models
        self.scheduler = scheduler
        self.metrics = metrics
        self.options = options or ServiceOptions()
        self._active = 0
        self._active_lock = threading.Lock()
        self.last_call_at = float("-inf")  # time.monotonic() of the latest Explain/ExplainStream call

    @property
    def active_calls(self) -> int:
        """Explain/ExplainStream calls being handled now (the drain waits for them)."""
        return self._active

    def _enter(self) -> None:
        with self._active_lock:
            self._active += 1
            self.last_call_at = time.monotonic()

    def _leave(self) -> None:
        with self._active_lock:
            self._active -= 1

    # ---- unary -------------------------------------------------------------------------
    def Explain(self, request, context):
        item = _Item("Explain", request)
        self._enter()
        try:
            try:
                self._prepare(item, _deadline(context))
                if not context.add_callback(item.job.cancel.set):  # the RPC already ended
                    item.job.cancel.set()
                self.scheduler.submit(item.job, wait=0.0)
                response = self._await(item, context.time_remaining())
            except Exception as exc:  # every failure becomes a status code; context.abort raises past this
                code, message = self._failed(item, exc)
                context.abort(code, message)
            self._succeeded(item, response)
            return response
        finally:
            self._leave()

    # ---- stream ------------------------------------------------------------------------
    def ExplainStream(self, request_iterator, context):
        stream = _Stream(self.options.stream_window)
        if not context.add_callback(stream.cancel):
            return
        self._enter()
        reader = threading.Thread(target=self._read_stream, name="explainrt-stream-reader", daemon=True,
                                  args=(request_iterator, stream, _deadline(context)))
        reader.start()
        try:
            while True:
                try:
                    item = stream.items.get(timeout=1.0)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if item is None:
                    return
                while True:
                    try:
                        kind, *payload = item.events.get(timeout=1.0)
                    except queue.Empty:
                        if not context.is_active():  # the client is gone: free this RPC thread
                            return
                        continue
                    if kind == "progress":
                        done, total = payload
                        yield pb.ExplainStreamResponse(index=item.index, request_id=item.request_id,
                                                       progress=pb.Progress(done=done, total=total))
                        continue
                    stream.finished(item)
                    if kind == "result":
                        yield pb.ExplainStreamResponse(index=item.index, request_id=item.request_id,
                                                       result=payload[0])
                    else:
                        code, message = payload
                        yield pb.ExplainStreamResponse(
                            index=item.index, request_id=item.request_id,
                            error=pb.ItemError(code=code.value[0], code_name=code.name, message=message))
                    break
        finally:
            stream.cancel()
            self._leave()

    def _read_stream(self, request_iterator, stream: "_Stream", deadline: Optional[float]) -> None:
        """Reader thread of one stream: validate and queue each request in order, at most ``window`` at once."""
        index = 0
        try:
            for request in request_iterator:
                if not stream.reserve():
                    return
                item = _Item("ExplainStream", request, index)
                index += 1
                stream.start(item)
                try:
                    self._prepare(item, deadline, stream=True)
                    stream.track(item)
                    self.scheduler.submit(item.job, wait=None)  # a full queue slows the stream down instead
                except Exception as exc:
                    code, message = self._failed(item, exc)
                    item.events.put(("error", code, message))
                    continue
                item.job.future.add_done_callback(lambda _f, it=item: self._stream_item_done(it))
        except grpc.RpcError:
            pass  # the client went away; stream.cancel has stopped the work
        except Exception:  # a bug in the reader must not hang the stream
            log.exception("event=stream_reader_failed", extra={"fields": {"event": "stream_reader_failed"}})
        finally:
            stream.items.put(None)

    def _stream_item_done(self, item: _Item) -> None:
        try:
            response = self._await(item, None)
        except Exception as exc:
            code, message = self._failed(item, exc)
            item.events.put(("error", code, message))
            return
        self._succeeded(item, response)
        item.events.put(("result", response))

    # ---- models ------------------------------------------------------------------------
    def _abort_unless_ready(self, rpc: str, context, t0: float) -> None:
        """Model RPCs answer UNAVAILABLE (retried by clients) while the models load, not a partial answer."""
        if not self.models.ready:
            code, message = status_for(NotReady("the server is still loading its models; retry in a few seconds"))
            self.metrics.observe(rpc, "", code.name, time.perf_counter() - t0)
            context.abort(code, message)

    def ListModels(self, request, context):
        t0 = time.perf_counter()
        self._abort_unless_ready("ListModels", context, t0)
        response = pb.ListModelsResponse()
        for name in self.models.names():
            model = self.models.get(name)
            meta, engine = model.metadata, model.explainer.engine
            response.models.add(name=name, input_size=list(meta.input_size), num_classes=meta.num_classes,
                                backend=engine.backend, device=engine.device)
        self.metrics.observe("ListModels", "", "OK", time.perf_counter() - t0)
        return response

    def GetModelMetadata(self, request, context):
        t0 = time.perf_counter()
        self._abort_unless_ready("GetModelMetadata", context, t0)
        try:
            model = self.models.get(request.model)
        except (ModelNotFound, InvalidInputError) as exc:
            code, message = status_for(exc)
            self.metrics.observe("GetModelMetadata", "", code.name, time.perf_counter() - t0)
            context.abort(code, message)
        self.metrics.observe("GetModelMetadata", "", "OK", time.perf_counter() - t0)
        return model_metadata(model)

    # ---- shared ------------------------------------------------------------------------
    def _prepare(self, item: _Item, deadline: Optional[float], stream: bool = False) -> None:
        """Validate the request and make its job (not yet queued)."""
        if not self.models.ready:
            raise NotReady("the server is still loading its models; retry in a few seconds (health: NOT_SERVING)")
        if not self.scheduler.accepting:
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
        task = item.task = parse_request(item.request, self.models, self.options.limits)
        progress = self._progress(item, stream)
        limit = self.options.max_response_bytes
        item.job = Job(run=lambda job: run_task(task, progress, job.cancel, limit), deadline=deadline,
                       name=f"{task.model.name}/{task.method}")

    def _progress(self, item: _Item, stream: bool):
        """progress(done, total) for the explainer: counts masked passes; on streams, queues progress messages."""
        model, method = item.task.model.name, item.task.method
        interval = self.options.progress_interval_s
        state = {"last": 0, "emitted": time.perf_counter()}

        def progress(done: int, total: int) -> None:
            delta = done - state["last"] if done >= state["last"] else done  # a new set of passes restarts at 0
            state["last"] = done
            if delta:
                self.metrics.count_masked_passes(model, method, delta)
            if stream and total:
                now = time.perf_counter()
                if now - state["emitted"] >= interval:
                    state["emitted"] = now
                    item.events.put(("progress", done, total))

        return progress

    def _await(self, item: _Item, timeout: Optional[float]) -> pb.ExplainResponse:
        job = item.job
        try:
            response = job.future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            job.cancel.set()
            raise DeadlineExceeded(
                f"the deadline passed after {time.perf_counter() - item.arrival:.2f} s, before the explanation "
                "finished; the server stopped its work. Give the call a longer deadline, or ask for less work "
                "(fewer masks, a smaller image)") from None
        response.timings.queue_s = job.queue_seconds
        response.timings.total_s = time.perf_counter() - item.arrival
        return response

    def _succeeded(self, item: _Item, response: pb.ExplainResponse) -> None:
        seconds = time.perf_counter() - item.arrival
        self.metrics.observe(item.rpc, item.method, "OK", seconds)
        self.metrics.queue_wait.observe(item.job.queue_seconds)
        self.metrics.forward_passes.labels(item.task.model.name, item.method).inc(response.forward_passes)
        log_event(log, "rpc", rpc=item.rpc, index=item.index if item.rpc == "ExplainStream" else None,
                  **describe(item.task), code="OK", ms=round(seconds * 1e3, 2),
                  queue_ms=round(item.job.queue_seconds * 1e3, 2), passes=response.forward_passes)

    def _failed(self, item: _Item, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        expired = item.job is not None and item.job.expired()
        code, message = status_for(exc, expired)
        seconds = time.perf_counter() - item.arrival
        method_label = item.method if item.method in METHODS else ""  # bounded label values only
        self.metrics.observe(item.rpc, method_label, code.name, seconds)
        level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
        log_event(log, "rpc", level, rpc=item.rpc, index=item.index if item.rpc == "ExplainStream" else None,
                  **(describe(item.task) if item.task else {"method": item.method or None}),
                  code=code.name, ms=round(seconds * 1e3, 2), error=message)
        if code == grpc.StatusCode.INTERNAL:
            log.error("event=internal_error rpc=%s", item.rpc, exc_info=(type(exc), exc, exc.__traceback__),
                      extra={"fields": {"event": "internal_error", "rpc": item.rpc}})
        return code, message


def _deadline(context) -> Optional[float]:
    """The RPC's deadline as a ``time.monotonic()`` instant (None without one)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def model_metadata(model) -> pb.ModelMetadataResponse:
    """GetModelMetadata's answer for a loaded model."""
    from ..api import Explainer

    meta, engine = model.metadata, model.explainer.engine
    response = pb.ModelMetadataResponse(
        name=model.name, input_name=meta.input_name, input_size=list(meta.input_size), mean=list(meta.mean),
        std=list(meta.std), logits_output=meta.logits_output or "", probs_output=meta.probs_output,
        activation_output=meta.activation_output, activation_layer=meta.activation_layer or "",
        activation_shape=list(meta.activation_shape), num_classes=meta.num_classes,
        labels=[meta.label(i) for i in range(meta.num_classes)], backend=engine.backend, device=engine.device,
        batch_size=model.explainer.batch_size)
    for spec, infos in ((response.inputs, engine.inputs), (response.outputs, engine.outputs)):
        for info in infos:
            spec.add(name=info.name, dtype=info.dtype, shape=[-1 if d is None else int(d) for d in info.shape])
    for name, params in Explainer.methods().items():
        method = response.methods.add(name=name)
        for key, default in params.items():
            method.parameters.add(name=key, default_json=json.dumps(default))
    return response
