"""Helpers of the server tests (tiny models, a server on loopback, polling)."""
from __future__ import annotations

import time

import torch

NUM_CLASSES = 10
INPUT_HW = (32, 32)


class TinyNet(torch.nn.Module):
    """Two conv blocks (16 channels at 8x8) and a linear head: fast enough for hundreds of requests."""

    def __init__(self, classes: int = NUM_CLASSES):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.head = torch.nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def export_tiny(path: str, seed: int) -> None:
    from explainrt.export import export_torch

    torch.manual_seed(seed)
    export_torch(TinyNet(), path, input_size=INPUT_HW, labels=[f"class-{i}" for i in range(NUM_CLASSES)],
                 name=f"tiny{seed}")


def start_server(models: str, **overrides):
    """A real server on 127.0.0.1 with a free port, models loaded, metrics on a free HTTP port."""
    from explainrt.server import ExplainServer, ServerConfig

    # max_masks raised: the deadline/drain tests need RISE requests that run for seconds on a tiny model.
    options = dict(host="127.0.0.1", port=0, metrics_port=0, workers=2, queue_size=16, progress_interval_s=0.02,
                   max_masks=1_000_000, max_targets=4, max_pixels=40_000_000)
    options.update(overrides)
    load = options.pop("load", True)
    return ExplainServer(ServerConfig(models=models, **options)).start(load=load)


def wait_for(condition, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``condition()`` until true or ``timeout``; returns its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())
