"""A small CNN trained in the test on planted evidence: a red or a blue square on grey noise.

The noise is grey (R = G = B), so no pixel of an image holds evidence of the colour it lacks;
a per-colour mask could still make colour out of grey (the adversarial evidence FGVis defends
against).
"""
from __future__ import annotations

import numpy as np

SIZE = 32
SQUARE = 8
CLASSES = ["red", "blue", "noise"]
MEAN, STD = (128.0, 128.0, 128.0), (64.0, 64.0, 64.0)
_COLOURS = {0: (220, 30, 30), 1: (30, 30, 220)}


def planted(label: int, rng, where=None):
    """(RGB uint8 image, (y0, x0) of its square or None): grey noise, and the class's square."""
    img = np.repeat(rng.integers(0, 256, (SIZE, SIZE, 1)), 3, axis=2).astype(np.uint8)
    if label == 2:
        return img, None
    y0, x0 = where if where is not None else rng.integers(2, SIZE - SQUARE - 2, 2)
    img[y0:y0 + SQUARE, x0:x0 + SQUARE] = _COLOURS[label]
    return img, (int(y0), int(x0))


def build(torch):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 3),
    )


def trained_square_model(torch, seed: int = 0, steps: int = 60):
    """The CNN trained (a second or two on the CPU) until it tells red, blue and noise apart."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build(torch)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    for _ in range(steps):
        labels = rng.integers(0, 3, 48)
        images = np.stack([planted(int(c), rng)[0] for c in labels])
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std
        loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels), label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
