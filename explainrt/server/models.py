"""The models a server holds: every exported ``*.onnx`` in one directory, named by file stem."""
from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
import threading
import time
from typing import Optional

from ..api import Explainer
from ..errors import ExplainRTError, InvalidInputError, ModelError
from .batcher import in_low_priority_thread, wrap
from .logs import log_event

log = logging.getLogger(__name__)


class ModelNotFound(ExplainRTError):
    """The request names a model the server does not have (→ NOT_FOUND)."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready to serve: its name, file and the explainer that runs it."""

    name: str
    path: str
    explainer: Explainer
    #: Held around each explanation when the engine may not take concurrent calls (see ``engine_lock``).
    lock: Optional[threading.Lock] = None

    @property
    def metadata(self):
        return self.explainer.metadata


def engine_lock(explainer: Explainer) -> Optional[threading.Lock]:
    """A lock for engines that may not run calls from several workers at once, else None.

    ONNX Runtime sessions are thread-safe (CPU and CUDA providers), so workers share them freely.
    A TensorRT execution context or a torch CUDA engine with its own stream and buffers is not
    assumed to be: its explanations run one at a time (each is already a large batched loop).
    """
    return None if explainer.engine.backend == "onnxruntime" else threading.Lock()


class ModelRepository:
    """Loads every exported model of ``directory`` (files without explainrt metadata are skipped).

    ``engine_options`` go to ``Explainer`` (backend, device, threads, ...); ``batch_size`` is the
    number of masked images per engine call. With ``max_queue_delay_s`` (seconds, 0 allowed) the
    engine calls of concurrent requests share engine batches (``batcher.BatchingEngine``).
    """

    def __init__(self, directory: str, batch_size: int = 64, max_queue_delay_s: Optional[float] = None,
                 on_batch=None, bulk_nice: int = 0, **engine_options):
        if os.path.isfile(directory):
            raise ModelError(f"--models takes a directory (every exported model in it is served), not the file "
                             f"{directory}; pass its directory: --models {os.path.dirname(directory) or '.'}")
        if not os.path.isdir(directory):
            raise ModelError(f"model directory not found: {directory}; pass --models DIR with exported .onnx files")
        self.directory = directory
        self.batch_size = int(batch_size)
        self.max_queue_delay_s = max_queue_delay_s  # None: no cross-request batching
        self._on_batch = on_batch  # on_batch(model, calls, rows), metrics of the batcher
        self.bulk_nice = bulk_nice  # CPU priority drop of the main session's threads, beside an express session
        self.engine_options = engine_options
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self.ready = False

    def candidates(self) -> list[str]:
        """Model names (file stems) in the directory, sorted."""
        return [os.path.splitext(os.path.basename(p))[0]
                for p in sorted(glob.glob(os.path.join(self.directory, "*.onnx")))]

    def load_all(self) -> list[str]:
        """Load every model of the directory; returns the names loaded. Raises if none loads."""
        skipped = []
        for name in self.candidates():
            path = os.path.join(self.directory, name + ".onnx")
            t0 = time.perf_counter()
            try:
                make = functools.partial(Explainer, path, batch_size=self.batch_size, max_batch=self.batch_size,
                                         **self.engine_options)
                # With an express lane, the main session's thread pool runs at a lower CPU priority
                # (made on a thread whose priority is lowered: its pool threads inherit it).
                express_lane = self.max_queue_delay_s is not None and self.engine_options.get(
                    "backend", "onnxruntime") == "onnxruntime" and self.bulk_nice > 0
                explainer = in_low_priority_thread(make, self.bulk_nice) if express_lane else make()
            except ModelError as exc:
                skipped.append(name)
                log_event(log, "model_skipped", logging.WARNING, model=name, path=path, reason=str(exc))
                continue
            if self.max_queue_delay_s is None:
                lock = engine_lock(explainer)
            else:  # the batcher's executor is the one caller of the engine: no lock around explanations
                on_batch = None if self._on_batch is None else (
                    lambda calls, rows, model=name: self._on_batch(model, calls, rows))
                explainer.engine = wrap(explainer.engine, self.max_queue_delay_s, name, on_batch,
                                        express=self._express_engine(path, explainer), bulk_nice=self.bulk_nice)
                lock = None
            with self._lock:
                self._models[name] = LoadedModel(name, path, explainer, lock)
            meta = explainer.metadata
            log_event(log, "model_loaded", model=name, path=path, backend=explainer.engine.backend,
                      device=explainer.engine.device, input=f"{meta.input_size[0]}x{meta.input_size[1]}",
                      classes=meta.num_classes, seconds=round(time.perf_counter() - t0, 3))
        if not self._models:
            raise ModelError(
                f"no exported model could be loaded from {self.directory}"
                + (f" (skipped: {', '.join(skipped)})" if skipped else " (no *.onnx files)")
                + "; export one with `explainrt export ... -o DIR/NAME.onnx`"
            )
        self.ready = True
        return self.names()

    def _express_engine(self, path: str, explainer: Explainer):
        """A second ONNX Runtime session (the same options) for cheap requests' calls; None for other engines.

        Its own thread pool is the point: a one-image run on the main session would wait behind each
        operator of a 64-image chunk (concurrent runs of one session share its pool).
        """
        if explainer.engine.backend != "onnxruntime":
            return None
        from ..runtime import load_engine

        options = dict(self.engine_options)
        return load_engine(path, max_batch=self.batch_size, **options)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def get(self, name: Optional[str]) -> LoadedModel:
        """The model called ``name``; an empty name picks the only model when there is exactly one."""
        with self._lock:
            if not name:
                if len(self._models) == 1:
                    return next(iter(self._models.values()))
                raise InvalidInputError(
                    f"name a model: this server has {len(self._models)} ({', '.join(sorted(self._models)) or 'none'})")
            model = self._models.get(name)
            if model is None:
                raise ModelNotFound(
                    f"unknown model {name!r}; this server has: {', '.join(sorted(self._models)) or 'none'} "
                    "(see ListModels)")
            return model

    def close(self) -> None:
        with self._lock:
            for model in self._models.values():
                model.explainer.close()
            self._models.clear()
            self.ready = False
