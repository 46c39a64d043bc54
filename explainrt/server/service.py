"""The ExplainService servicer on ``grpc.aio``: decode and validate, hand to the scheduler, map errors to codes.

Waiting holds no thread: every RPC is a coroutine on the server's one event loop, and only the
explanations themselves run on the scheduler's worker threads. A thousand idle streams cost a
thousand coroutines, never the threads that health checks and metadata RPCs need.

Request bytes are decoded here, not by grpcio (its handlers get raw bytes), so a message that
is not valid protobuf is INVALID_ARGUMENT, not grpcio's INTERNAL. Responses are serialised on
the worker that built them, so a large response never holds up the event loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Optional

import grpc
from google.protobuf.message import DecodeError

from ..errors import ExplainRTError, InvalidInputError, MissingDependencyError, ModelError
from ..explainers import METHODS
from ..explainers.driver import Cancelled
from ..proto import REPLICA_KEY, SERVICE_NAME
from ..proto.explainrt.v1 import explainrt_pb2 as pb
from .logs import log_event
from .metrics import ServerMetrics
from .models import ModelNotFound, ModelRepository
from .scheduler import DeadlineExceeded, Job, OverBudget, QueueFull, Scheduler, ShuttingDown
from .tasks import ExplainTask, RequestLimits, ResponseTooLarge, check_built_size, describe, parse_request, run_task

log = logging.getLogger(__name__)

PRIORITY_RANGE = (-10, 10)
PARSE_OFF_LOOP_BYTES = 1 << 20  # requests larger than this are validated on a thread, not on the event loop
SLOT_POLL_S = 0.02  # a stream item waiting for a queue slot looks again this often
_RESULT_FIELD = pb.ExplainStreamResponse.DESCRIPTOR.fields_by_name["result"].number


class NotReady(ExplainRTError):
    """The server is still loading its models (→ UNAVAILABLE)."""


class TooManyCalls(ExplainRTError):
    """More explain calls are open than the server takes at once (→ RESOURCE_EXHAUSTED)."""


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
    if isinstance(exc, (QueueFull, ResponseTooLarge, OverBudget, TooManyCalls)):
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
    max_calls: int = 1024  # Explain + ExplainStream calls open at once
    replica: str = ""  # this server's name, sent to clients in the REPLICA_KEY metadata ("" sends none)
    limits: RequestLimits = dataclasses.field(default_factory=RequestLimits)


def decode(message_type, data: bytes, what: str):
    """Parse request bytes ourselves: bytes that are not a valid message are the client's mistake."""
    try:
        return message_type.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidInputError(f"the request is not a valid {what} message ({exc}); check the client's "
                                "explainrt.v1 proto (reflection or explainrt/proto/explainrt/v1/explainrt.proto)") \
            from None


def _embed(field: int, payload: bytes) -> bytes:
    """``payload`` (a serialised message) as field ``field`` of an enclosing message, in wire format."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)
    return varint(field << 3 | 2) + varint(len(payload)) + payload


class _Item:
    """One request in flight: its task, job, timing and (for streams) its outgoing events."""

    def __init__(self, rpc: str, index: int = 0):
        self.rpc, self.index = rpc, index
        self.request: Optional[pb.ExplainRequest] = None
        self.arrival = time.perf_counter()
        self.task: Optional[ExplainTask] = None
        self.job: Optional[Job] = None
        self.forward_passes = 0
        self.events: "asyncio.Queue[tuple]" = asyncio.Queue()

    @property
    def request_id(self) -> str:
        return self.request.request_id if self.request is not None else ""

    @property
    def method(self) -> str:
        return self.request.method if self.request is not None else ""


class ExplainServicer:
    """Thin gRPC layer over the model repository and the scheduler (every handler is a coroutine)."""

    def __init__(self, models: ModelRepository, scheduler: Scheduler, metrics: ServerMetrics,
                 options: Optional[ServiceOptions] = None):
        self.models = models
        self.scheduler = scheduler
        self.metrics = metrics
        self.options = options or ServiceOptions()
        self._active = 0
        self.last_call_at = float("-inf")  # time.monotonic() of the latest Explain/ExplainStream call
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers: requests arrive as bytes (decoded by ``decode``)."""
        def unary(fn, response_type=None):
            return grpc.unary_unary_rpc_method_handler(
                fn, response_serializer=None if response_type is None else response_type.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Explain": unary(self.Explain),  # the worker serialises the response
            "ExplainStream": grpc.stream_stream_rpc_method_handler(self.ExplainStream),
            "ListModels": unary(self.ListModels, pb.ListModelsResponse),
            "GetModelMetadata": unary(self.GetModelMetadata, pb.ModelMetadataResponse),
        })

    def _replica_metadata(self) -> tuple:
        return ((REPLICA_KEY, self.options.replica),) if self.options.replica else ()

    @property
    def active_calls(self) -> int:
        """Explain/ExplainStream calls being handled now (the drain waits for them)."""
        return self._active

    def _enter(self) -> None:
        """Count one more explain call (on the event loop: no lock needed)."""
        self.last_call_at = time.monotonic()
        self._active += 1

    def _check_capacity(self) -> None:
        if self._active > self.options.max_calls:
            raise TooManyCalls(f"the server has {self.options.max_calls} explain calls open already (--max-calls); "
                               "retry with backoff, or send several images over one ExplainStream")

    def _leave(self) -> None:
        self._active -= 1

    # ---- unary -------------------------------------------------------------------------
    async def Explain(self, data: bytes, context):
        item = _Item("Explain")
        self._enter()
        # In the trailers, not the headers: a response's headers commit the call, and a call answered
        # UNAVAILABLE without them is one gRPC's retry policy may still send to another replica.
        context.set_trailing_metadata(self._replica_metadata())
        try:
            try:
                self._check_capacity()
                item.request = decode(pb.ExplainRequest, data, "ExplainRequest")
                await self._prepare(item, _deadline(context), stream=False)
                self.scheduler.submit(item.job)
                payload = await self._await(item, context.time_remaining())
            except asyncio.CancelledError:  # the client went away or the deadline passed
                if item.job is not None:
                    item.job.cancel.set()
                self._failed(item, Cancelled("the client cancelled the call"))
                raise
            except Exception as exc:  # every failure becomes a status code; abort raises past this
                code, message = self._failed(item, exc)
                await context.abort(code, message)
            self._succeeded(item)
            return payload
        finally:
            self._leave()

    # ---- stream ------------------------------------------------------------------------
    async def ExplainStream(self, request_iterator, context):
        self._enter()
        items: "asyncio.Queue[Optional[_Item]]" = asyncio.Queue()
        window = asyncio.Semaphore(max(1, self.options.stream_window))
        jobs: set = set()
        reader = None
        try:
            try:
                self._check_capacity()
            except TooManyCalls as exc:
                code, message = status_for(exc)
                self.metrics.observe("ExplainStream", "", code.name, 0.0)
                await context.abort(code, message, self._replica_metadata())
            if self.options.replica:  # a stream's items are all answered by this server: say so up front
                await context.send_initial_metadata(self._replica_metadata())
            reader = asyncio.ensure_future(self._read_stream(request_iterator, items, window, jobs,
                                                             _deadline(context)))
            while True:
                item = await items.get()
                if item is None:
                    return
                while True:
                    kind, *payload = await item.events.get()
                    if kind == "progress":
                        done, total = payload
                        yield pb.ExplainStreamResponse(index=item.index, request_id=item.request_id,
                                                       progress=pb.Progress(done=done, total=total)).SerializeToString()
                        continue
                    window.release()
                    jobs.discard(item.job)
                    if kind == "result":
                        yield payload[0]
                    else:
                        code, message = payload
                        yield pb.ExplainStreamResponse(
                            index=item.index, request_id=item.request_id,
                            error=pb.ItemError(code=code.value[0], code_name=code.name,
                                               message=message)).SerializeToString()
                    break
        finally:
            if reader is not None:
                reader.cancel()
            for job in list(jobs):  # the call ended (client cancel, deadline, error): stop its work
                job.cancel.set()
            self._leave()

    async def _read_stream(self, request_iterator, items: asyncio.Queue, window: asyncio.Semaphore, jobs: set,
                           deadline: Optional[float]) -> None:
        """Validate and queue each request in order, at most ``window`` of the stream at once."""
        index = 0
        try:
            async for data in request_iterator:
                await window.acquire()
                item = _Item("ExplainStream", index)
                index += 1
                items.put_nowait(item)
                try:
                    item.request = decode(pb.ExplainRequest, data, "ExplainRequest")
                    await self._prepare(item, deadline, stream=True)
                    jobs.add(item.job)
                    await self._submit_when_a_slot_frees(item.job)  # a full queue slows the stream down
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    code, message = self._failed(item, exc)
                    item.events.put_nowait(("error", code, message))
                    continue
                loop = asyncio.get_running_loop()
                item.job.future.add_done_callback(
                    lambda _f, it=item: loop.call_soon_threadsafe(self._stream_item_done, it))
        except asyncio.CancelledError:
            pass
        except grpc.RpcError:
            pass  # the client went away; the handler's finally stops the work
        except Exception:  # a bug in the reader must not hang the stream
            log.exception("event=stream_reader_failed", extra={"fields": {"event": "stream_reader_failed"}})
        finally:
            items.put_nowait(None)

    async def _submit_when_a_slot_frees(self, job: Job) -> None:
        while True:
            try:
                self.scheduler.submit(job)
                return
            except QueueFull:
                if job.dead():
                    raise DeadlineExceeded("the deadline passed while the request waited for a queue slot") \
                        if job.expired() else Cancelled("the request was cancelled while waiting for a queue slot")
                await asyncio.sleep(SLOT_POLL_S)

    def _stream_item_done(self, item: _Item) -> None:
        """On the event loop, once the item's job has finished."""
        try:
            payload = item.job.future.result()
        except BaseException as exc:  # noqa: BLE001 (every failure becomes an item error)
            code, message = self._failed(item, exc)
            item.events.put_nowait(("error", code, message))
            return
        self._succeeded(item)
        item.events.put_nowait(("result", payload))

    # ---- models ------------------------------------------------------------------------
    async def _abort_unless_ready(self, rpc: str, context, t0: float) -> None:
        """Model RPCs answer UNAVAILABLE (retried by clients) while the models load, not a partial answer."""
        if not self.models.ready:
            await self._abort(rpc, context, t0, NotReady("the server is still loading its models; retry in a few "
                                                         "seconds"))

    async def _abort(self, rpc: str, context, t0: float, exc: BaseException) -> None:
        code, message = status_for(exc)
        self.metrics.observe(rpc, "", code.name, time.perf_counter() - t0)
        await context.abort(code, message)

    async def ListModels(self, data: bytes, context):
        t0 = time.perf_counter()
        context.set_trailing_metadata(self._replica_metadata())
        try:
            decode(pb.ListModelsRequest, data, "ListModelsRequest")
        except InvalidInputError as exc:
            await self._abort("ListModels", context, t0, exc)
        await self._abort_unless_ready("ListModels", context, t0)
        response = pb.ListModelsResponse()
        for name in self.models.names():
            model = self.models.get(name)
            meta, engine = model.metadata, model.explainer.engine
            response.models.add(name=name, input_size=list(meta.input_size), num_classes=meta.num_classes,
                                backend=engine.backend, device=engine.device)
        self.metrics.observe("ListModels", "", "OK", time.perf_counter() - t0)
        return response

    async def GetModelMetadata(self, data: bytes, context):
        t0 = time.perf_counter()
        context.set_trailing_metadata(self._replica_metadata())
        await self._abort_unless_ready("GetModelMetadata", context, t0)
        try:
            request = decode(pb.GetModelMetadataRequest, data, "GetModelMetadataRequest")
            model = self.models.get(request.model)
        except (ModelNotFound, InvalidInputError) as exc:
            await self._abort("GetModelMetadata", context, t0, exc)
        self.metrics.observe("GetModelMetadata", "", "OK", time.perf_counter() - t0)
        return model_metadata(model)

    # ---- shared ------------------------------------------------------------------------
    async def _prepare(self, item: _Item, deadline: Optional[float], stream: bool) -> None:
        """Validate the request and make its job (not yet queued)."""
        if not self.models.ready:
            raise NotReady("the server is still loading its models; retry in a few seconds (health: NOT_SERVING)")
        if not self.scheduler.accepting:
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
        request = item.request
        low, high = PRIORITY_RANGE
        if not low <= request.priority <= high:
            raise InvalidInputError(f"priority must be in {low}..{high}, got {request.priority}")
        if request.ByteSize() > PARSE_OFF_LOOP_BYTES:  # decoding checks of big tensors: off the event loop
            task = await asyncio.to_thread(parse_request, request, self.models, self.options.limits)
        else:
            task = parse_request(request, self.models, self.options.limits)
        item.task = task
        progress = self._progress(item, stream, asyncio.get_running_loop())
        item.job = Job(run=lambda job: self._execute(item, job, progress, stream), deadline=deadline,
                       name=f"{task.model.name}/{task.method}", cost=getattr(task, "cost_passes", 1),
                       memory=getattr(task, "memory_bytes", 0), priority=request.priority, method=task.method)

    def _execute(self, item: _Item, job: Job, progress, stream: bool) -> bytes:
        """On a worker: explain, build and serialise the response (the event loop only sends bytes)."""
        from .batcher import request_scope

        with request_scope(item.task.model.explainer.engine, cheap=self.scheduler.cheap(job), cancel=job.cancel):
            response = run_task(item.task, progress, job.cancel)
        item.forward_passes = int(response.forward_passes)
        response.timings.queue_s = job.queue_seconds
        response.timings.total_s = time.perf_counter() - item.arrival
        body = response.SerializeToString()
        check_built_size(len(body), self.options.max_response_bytes)
        if not stream:
            return body
        header = pb.ExplainStreamResponse(index=item.index, request_id=item.request_id).SerializeToString()
        return header + _embed(_RESULT_FIELD, body)

    def _progress(self, item: _Item, stream: bool, loop: asyncio.AbstractEventLoop):
        """progress(done, total) for the explainer: counts masked passes; on streams, sends progress messages."""
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
                    loop.call_soon_threadsafe(item.events.put_nowait, ("progress", done, total))

        return progress

    async def _await(self, item: _Item, timeout: Optional[float]) -> bytes:
        job = item.job
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout)
        except asyncio.TimeoutError:
            job.cancel.set()
            raise DeadlineExceeded(
                f"the deadline passed after {time.perf_counter() - item.arrival:.2f} s, before the explanation "
                "finished; the server stopped its work. Give the call a longer deadline, or ask for less work "
                "(fewer masks, a smaller image)") from None

    def _succeeded(self, item: _Item) -> None:
        seconds = time.perf_counter() - item.arrival
        self.metrics.observe(item.rpc, item.method, "OK", seconds)
        self.metrics.forward_passes.labels(item.task.model.name, item.method).inc(item.forward_passes)
        log_event(log, "rpc", rpc=item.rpc, index=item.index if item.rpc == "ExplainStream" else None,
                  **describe(item.task), code="OK", ms=round(seconds * 1e3, 2),
                  queue_ms=round(item.job.queue_seconds * 1e3, 2), passes=item.forward_passes)

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
        activation_output=meta.activation_output or "", activation_layer=meta.activation_layer or "",
        activation_shape=list(meta.activation_shape or ()), num_classes=meta.num_classes,
        labels=[meta.label(i) for i in range(meta.num_classes)], backend=engine.backend, device=engine.device,
        batch_size=model.explainer.batch_size)
    for spec, infos in ((response.inputs, engine.inputs), (response.outputs, engine.outputs)):
        for info in infos:
            spec.add(name=info.name, dtype=info.dtype, shape=[-1 if d is None else int(d) for d in info.shape])
    for name, params in Explainer.methods().items():
        if not _offered(name, meta, engine):
            continue  # a black-box model, or gradients on an engine without them
        method = response.methods.add(name=name)
        for key, default in params.items():
            method.parameters.add(name=key, default_json=json.dumps(default))
    return response


def _offered(name: str, meta, engine) -> bool:
    """Whether the model can run method ``name`` with its defaults here (the checks a request meets)."""
    from ..api import check_gradients
    from ..explainers import check_applicable

    algo = METHODS[name].create()
    try:
        check_applicable(name, algo, meta)
        if algo.gradients_needed(meta):
            check_gradients(engine, name)
    except InvalidInputError:
        return False
    return True
