"""Latency benchmarking: per method, backend and batch size; the machine described; peers compared.

Each configuration is warmed up, then timed over repeated ``Explainer.explain`` calls
(end to end: preprocessing, base pass, masked passes, weighting). Percentiles use linear
interpolation, so with few runs p99 is close to the slowest run. Memory is the peak resident
set size sampled from /proc/self/statm every millisecond by a background thread during the
timed runs (ONNX Runtime allocates outside Python, so tracemalloc would miss it), also as
growth over the RSS before them; ``ru_maxrss`` growth (the process high-water mark) is
reported beside it. On systems without /proc only the ru_maxrss growth is available.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import platform
import resource
import shutil
import subprocess
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from .base import format_rows

log = logging.getLogger(__name__)

LIBRARIES = ("explainrt", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "opencv-python-headless", "torch",
             "torchvision", "cupy-cuda13x", "cupy-cuda12x", "tensorrt", "grad-cam", "captum")


@dataclasses.dataclass
class LatencyStats:
    """Timing of one (method, backend, device, batch size) configuration."""

    method: str
    backend: str
    device: str
    batch_size: int
    warmup: int
    times_s: list
    forward_passes: int
    peak_rss_mb: Optional[float]  # sampled peak RSS of the process during the timed runs, MiB
    rss_growth_mb: Optional[float]  # that peak − the RSS before the runs, MiB
    maxrss_delta_mb: float  # ru_maxrss (high-water mark) growth during the runs, MiB

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.times_s, q))

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def passes_per_s(self) -> float:
        return self.forward_passes / self.p50 if self.p50 > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"method": self.method, "backend": self.backend, "device": self.device, "batch_size": self.batch_size,
                "warmup": self.warmup, "runs": len(self.times_s), "p50_s": self.p50, "p90_s": self.percentile(90),
                "p99_s": self.percentile(99), "mean_s": float(np.mean(self.times_s)),
                "min_s": float(np.min(self.times_s)), "forward_passes": self.forward_passes,
                "passes_per_s": self.passes_per_s, "peak_rss_mb": self.peak_rss_mb,
                "rss_growth_mb": self.rss_growth_mb, "maxrss_delta_mb": self.maxrss_delta_mb, "times_s": list(self.times_s)}


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if platform.system() == "Darwin" else value * 1024


class PeakMemory:
    """Context manager: peak RSS (sampled), its growth over the RSS at entry, ru_maxrss growth.

    Memory freed by an earlier stage usually stays in the process (allocator caches), so the
    growth shows only what a stage needed *beyond* what the process already held; the peak
    is the absolute footprint.
    """

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peak_mb: Optional[float] = None
        self.growth_mb: Optional[float] = None
        self.maxrss_delta_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._start = _rss_bytes()
        self._peak = self._start or 0
        self._maxrss = _maxrss_bytes()
        self._thread = None
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            peak = max(self._peak, _rss_bytes() or 0)
            self.peak_mb = peak / 2 ** 20
            self.growth_mb = max(0, peak - self._start) / 2 ** 20
        self.maxrss_delta_mb = (_maxrss_bytes() - self._maxrss) / 2 ** 20


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[str]:
    """GPU name, memory and driver per nvidia-smi (empty without one)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def library_versions() -> dict:
    """Installed versions (package metadata, nothing imported) of the libraries that matter here."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if "explainrt" not in versions:
        from .. import __version__

        versions["explainrt"] = __version__
    return versions


def describe_machine() -> dict:
    """CPU model, cores (and those this process may use), GPUs, OS, Python and library versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": usable, "gpus": gpus(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "libraries": library_versions()}


#: photographs that ship with scikit-image (no download); "motorcycle_left" is stereo_motorcycle's left view
SAMPLE_IMAGES = ("chelsea", "coffee", "motorcycle_left", "camera", "astronaut", "rocket", "retina")


def sample_image(name: str) -> np.ndarray:
    """A scikit-image photograph by name as RGB uint8 (H, W, 3)."""
    from ..errors import InvalidInputError, require

    data = require("skimage.data", "demo", f"the scikit-image photograph {name!r}")
    loader = getattr(data, "stereo_motorcycle" if name == "motorcycle_left" else name, None)
    if loader is None or not callable(loader) or name.startswith("_"):
        raise InvalidInputError(f"{name!r} is neither a file nor a scikit-image photograph (e.g. {', '.join(SAMPLE_IMAGES)})")
    img = loader()
    img = img[0] if isinstance(img, tuple) else img
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3):
        raise InvalidInputError(f"scikit-image's {name!r} is not a photograph")
    img = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3]
    return np.ascontiguousarray(img.astype(np.uint8))


def time_explain(explainer, image, method: str, params: Optional[dict] = None, warmup: int = 1,
                 repeat: int = 5) -> LatencyStats:
    """Warm up, then time ``repeat`` calls of ``explainer.explain(image, method, **params)``."""
    params = params or {}
    result = None
    for _ in range(warmup):
        result = explainer.explain(image, method, **params)
    times = []
    with PeakMemory() as memory:
        for _ in range(repeat):
            t0 = time.perf_counter()
            result = explainer.explain(image, method, **params)
            times.append(time.perf_counter() - t0)
    engine = explainer.engine
    return LatencyStats(method, engine.backend, engine.device, explainer.batch_size, warmup, times,
                        result.forward_passes, _round(memory.peak_mb), _round(memory.growth_mb),
                        round(memory.maxrss_delta_mb, 1))


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def run_bench(model_path: str, image, methods: Sequence[str], batch_sizes: Sequence[int],
              backend: str = "onnxruntime", device: str = "cpu", threads: Optional[int] = None, warmup: int = 1,
              repeat: int = 5, params: Optional[dict] = None,
              on_result: Optional[Callable[[LatencyStats], None]] = None) -> list[LatencyStats]:
    """Time every method at every batch size on one engine (opened once with max_batch = max(batch_sizes))."""
    from ..api import Explainer
    from ..runtime import load_engine

    options = {"threads": threads} if threads else {}
    engine = load_engine(model_path, backend=backend, device=device, max_batch=max(batch_sizes), **options)
    rows = []
    try:
        for method in methods:
            for bs in batch_sizes:
                explainer = Explainer(engine, batch_size=bs)
                rows.append(time_explain(explainer, image, method, (params or {}).get(method), warmup, repeat))
                log.info("%s bs=%d: p50 %.3f s", method, bs, rows[-1].p50)
                if on_result:
                    on_result(rows[-1])
    finally:
        engine.close()
    return rows


def format_bench_table(rows: Sequence[LatencyStats]) -> str:
    """One line per configuration: percentiles, passes, passes/s, memory."""
    header = ["method", "backend", "device", "batch", "p50 s", "p90 s", "p99 s", "passes", "passes/s",
              "peak RSS MiB", "RSS growth MiB", "maxrss Δ MiB"]
    body = []
    for r in rows:
        body.append([r.method, r.backend, r.device, str(r.batch_size), f"{r.p50:.4f}", f"{r.percentile(90):.4f}",
                     f"{r.percentile(99):.4f}", str(r.forward_passes), f"{r.passes_per_s:.1f}",
                     "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}",
                     "-" if r.rss_growth_mb is None else f"{r.rss_growth_mb:.1f}", f"{r.maxrss_delta_mb:.1f}"])
    return format_rows(header, body)


def format_machine(machine: dict) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items())
    gpu = "; ".join(machine["gpus"]) or "none"
    return (f"machine: {machine['cpu']}, {machine['cpus_usable']}/{machine['cpu_count']} cores usable, GPU: {gpu}, "
            f"{machine['os']}, Python {machine['python']}\nlibraries: {libs}")


def plot_bench(path: str, rows: Sequence[LatencyStats], machine: dict, title: Optional[str] = None) -> None:
    """PNG of p50 (solid) and p99 (dashed) latency per method against batch size, and forward
    passes per second; the machine and library versions in the caption (matplotlib, Agg backend)."""
    import textwrap

    from ..errors import require

    matplotlib = require("matplotlib", "eval", "plotting benchmark results")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (lat, rate) = plt.subplots(1, 2, figsize=(11, 4.6))
    by_config: dict = {}
    for r in rows:
        by_config.setdefault(f"{r.method} ({r.backend}, {r.device})", []).append(r)
    for i, (name, runs) in enumerate(by_config.items()):
        runs = sorted(runs, key=lambda r: r.batch_size)
        sizes = [r.batch_size for r in runs]
        colour = f"C{i % 10}"
        lat.plot(sizes, [r.p50 for r in runs], "o-", color=colour, label=f"{name} p50")
        lat.plot(sizes, [r.percentile(99) for r in runs], "s--", color=colour, alpha=0.7, label=f"{name} p99")
        rate.plot(sizes, [r.passes_per_s for r in runs], "o-", color=colour, label=name)
    for ax, ylabel, heading in ((lat, "seconds per explanation", "latency (p50 solid, p99 dashed)"),
                                (rate, "forward passes per second (at p50)", "throughput")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r.batch_size for r in rows}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("batch size (masked images per engine call)")
        ax.set_ylabel(ylabel)
        ax.set_title(heading)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    lat.set_yscale("log")
    if title:
        fig.suptitle(title)
    caption = "\n".join(textwrap.wrap(format_machine(machine).replace("\n", "; "), 170))
    fig.text(0.01, 0.01, caption, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.04 + 0.02 * caption.count("\n"), 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
