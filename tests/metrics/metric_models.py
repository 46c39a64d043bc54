"""Tiny torch models for the metric tests (built in code: no weights, no network)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

REGION = (slice(2, 6), slice(2, 6))  # rows 2..5, columns 2..5 of an 8×8 input: 16 pixels
REGION_SCALE = 4.0


class RegionScore(nn.Module):
    """Two classes; logit 0 = scale · mean of the input over REGION (every channel), logit 1 = 0.

    So p_0 = sigmoid(scale · m) with m that mean: a deletion curve is known by hand.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1)  # only to give the export an activation output

    def forward(self, x):
        feats = torch.relu(self.features(x))
        m = x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3))
        logit0 = REGION_SCALE * m + 0.0 * feats.mean(dim=(1, 2, 3))
        return torch.stack([logit0, torch.zeros_like(logit0)], dim=1)


class TinyCNN(nn.Module):
    """conv-relu-conv-relu-pool-fc on 16×16 inputs, 4 classes, seeded random weights."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act2(self.conv2(self.act(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))
