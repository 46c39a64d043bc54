"""Naive, independent implementations of ALGORITHMS.md, and the tiny model they are checked on.

Nothing here uses explainrt's kernels, driver or method code: every masked image is made with
skimage / torch resampling in float64 and sent through the model one at a time (a plain
onnxruntime session, batch of 1); every sum is a Python loop. These are slow on purpose and
exist only to be obviously right.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from skimage.transform import resize as sk_resize

INPUT_HW = (32, 32)
NUM_CLASSES = 5
CHANNELS = 20

# Channels of the explained layer built to exercise the exact shortcuts of the driver/methods.
DUPLICATE_CHANNELS = {2: 0, 4: 1, 13: 6}  # copy: source  → identical activations, identical masks
DEAD_CHANNELS = {5: -1.0, 7: -0.5}  # zero weights, negative bias → ReLU gives all zeros
CONSTANT_CHANNELS = {9: 2.0, 10: 0.3}  # zero weights, positive bias → constant map (2.0 > τ; 0.1 < 0.3 < 0.5)


# --------------------------------------------------------------------------------------------
# tiny model and image
# --------------------------------------------------------------------------------------------

def build_tiny_model() -> torch.nn.Module:
    """conv3x3(3→8)+ReLU, conv3x3/2(8→20)+ReLU (explained layer, 20×16×16), GAP, linear → 5.

    Weights are scaled so activations straddle SIDU's thresholds 0.1 and 0.5; some channels are
    exact copies of others, dead (all zero) or constant, on purpose.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, CHANNELS, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(CHANNELS, NUM_CLASSES),
    )
    with torch.no_grad():
        model[0].weight *= 3.0
        conv = model[2]
        conv.weight *= 5.0
        conv.bias += 0.2
        for dst, src in DUPLICATE_CHANNELS.items():
            conv.weight[dst] = conv.weight[src]
            conv.bias[dst] = conv.bias[src]
        for ch, bias in {**DEAD_CHANNELS, **CONSTANT_CHANNELS}.items():
            conv.weight[ch] = 0.0
            conv.bias[ch] = bias
        model[6].weight *= 3.0
    return model.eval()


# A second model whose explained layer (10×11×11) is upsampled ×3 to a 33×33 input: interpolation
# fractions 1/3, 2/3 are not exact in binary, so float32 bilinear weights need not sum to exactly
# 1 and a constant map c can come out of the upsample as c ± 1 ulp (true for 0.1, 0.9, 1.7).
ODD_INPUT_HW = (33, 33)
ODD_CONSTANT_CHANNELS = {1: 0.1, 4: 0.9, 6: 1.7, 8: 0.7}
ODD_DEAD_CHANNELS = {3: -1.0}


def build_odd_scale_model() -> torch.nn.Module:
    """conv3x3(3→8)+ReLU, conv3x3/3(8→10)+ReLU (10×11×11), GAP, linear → 5, with constant channels."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 10, 3, stride=3), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(10, NUM_CLASSES),
    )
    with torch.no_grad():
        model[0].weight *= 3.0
        conv = model[2]
        conv.weight *= 5.0
        conv.bias += 0.2
        for ch, bias in {**ODD_DEAD_CHANNELS, **ODD_CONSTANT_CHANNELS}.items():
            conv.weight[ch] = 0.0
            conv.bias[ch] = bias
        model[6].weight *= 3.0
    return model.eval()


def tiny_image(seed: int = 1, hw=INPUT_HW) -> np.ndarray:
    """An RGB uint8 picture (32×32 by default): a few coloured Gaussian blobs plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
    img = np.zeros((*hw, 3))
    for _ in range(4):
        cy, cx = rng.uniform(0, hw[0]), rng.uniform(0, hw[1])
        r = rng.uniform(4, 10)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 10, img.shape) + 30, 0, 255).astype(np.uint8)


def preprocess(img: np.ndarray) -> np.ndarray:
    """The model was exported with mean 0 and std 255: x = img / 255, (1, 3, H, W) float32."""
    return (img.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None].copy()


class NaiveModel:
    """The exported ONNX file run with a plain onnxruntime session, strictly one image per call."""

    def __init__(self, path: str):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.calls = 0

    def _run(self, x: np.ndarray):
        x = np.asarray(x, dtype=np.float32)
        assert x.ndim == 4 and x.shape[:2] == (1, 3), "the naive model runs one image at a time"
        self.calls += 1
        logits, acts = self.session.run(["logits", "activations"], {"input": x})
        return logits[0].astype(np.float64), acts[0]

    def activations(self, x: np.ndarray) -> np.ndarray:
        return self._run(x)[1]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self._run(x)[0]

    def probs(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def minmax(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def up_reflect(m: np.ndarray, hw) -> np.ndarray:
    """Bilinear, half-pixel centres, mirrored border: what SIDU's and RISE's reference code use."""
    return sk_resize(np.asarray(m, np.float64), hw, order=1, mode="reflect", anti_aliasing=False)


def up_clamp(m: np.ndarray, hw) -> np.ndarray:
    """Bilinear, align_corners=False, edge-clamped (torch's default, = cv2.INTER_LINEAR)."""
    t = torch.from_numpy(np.asarray(m, np.float64))[None, None]
    return F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False)[0, 0].numpy()


def masked(x: np.ndarray, mask_hw: np.ndarray) -> np.ndarray:
    """x ⊙ M (a masked-out pixel is 0 in normalised space)."""
    return (np.asarray(x, np.float64) * mask_hw[None, None]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the methods, as ALGORITHMS.md writes them
# --------------------------------------------------------------------------------------------

def sidu(model: NaiveModel, x: np.ndarray, targets, threshold: float = 0.5, sigma: float = 0.25):
    """S_c for every target (T, H, W), plus the masks used. Every channel's mask is run (no dedupe)."""
    H, W = x.shape[-2:]
    acts = model.activations(x)
    p_org = model.probs(x)
    n = acts.shape[0]
    masks = [(acts[i] > threshold).astype(np.float64) for i in range(n)]
    ups = [up_reflect(m, (H, W)) for m in masks]
    p = [model.probs(masked(x, u)) for u in ups]
    uniq = np.zeros(n)
    for i in range(n):
        for j in range(n):
            uniq[i] += np.sqrt(np.sum((p[i] - p[j]) ** 2))
    uniq = minmax(uniq)
    maps = np.zeros((len(targets), H, W))
    for t, c in enumerate(targets):
        for i in range(n):
            sd = np.exp(-((p_org[c] - p[i][c]) ** 2) / (2.0 * sigma ** 2))
            maps[t] += sd * uniq[i] * ups[i]
        maps[t] /= n
    return maps, np.stack(masks)


def scorecam(model: NaiveModel, x: np.ndarray, targets, score: str = "prob", channel_softmax: bool = False,
             baseline: bool = False, keep_constant: bool = False):
    """L_c (T, H, W) after ReLU (before min-max), and the number of skipped channels.

    ``keep_constant`` runs constant channels too, with an all-zero mask (the convention of
    pytorch-grad-cam, which divides by max − min + ε) — to show that skipping them is exact.
    """
    H, W = x.shape[-2:]
    acts = model.activations(x)

    def class_scores(inp):
        z = model.logits(inp)
        return z if score == "logit" else softmax(z)

    base_scores = class_scores(np.zeros_like(x)) if baseline else None
    kept_u, kept_s, skipped = [], [], 0
    for k in range(acts.shape[0]):
        u = up_clamp(acts[k], (H, W))
        # "skip k if max U_k = min U_k": an upsampled map is constant exactly when the
        # low-resolution one is; testing A_k keeps float rounding of the interpolation out of it
        if acts[k].max() == acts[k].min():
            skipped += 1
            if not keep_constant:
                continue
            m = np.zeros_like(u)
        else:
            m = (u - u.min()) / (u.max() - u.min())
        s = class_scores(masked(x, m))
        if baseline:
            s = s - base_scores
        kept_u.append(u)
        kept_s.append(s)
    scores = np.array(kept_s)[:, list(targets)]  # (N_kept, T)
    if channel_softmax:
        for t in range(scores.shape[1]):
            scores[:, t] = softmax(scores[:, t])
    maps = np.zeros((len(targets), H, W))
    for t in range(len(targets)):
        for k, u in enumerate(kept_u):
            maps[t] += scores[k, t] * u
    return np.maximum(maps, 0.0), skipped


def rise_draws(n: int, s: int, p1: float, hw, seed: int):
    """RISE's grids and shifts, drawn in the order explainrt documents (grids, then dy's, then dx's)."""
    H, W = hw
    cell_h, cell_w = int(np.ceil(H / s)), int(np.ceil(W / s))
    rng = np.random.default_rng(seed)
    grids = rng.random((n, s, s)) < p1
    dys = rng.integers(0, cell_h, n)
    dxs = rng.integers(0, cell_w, n)
    return grids, dys, dxs, ((s + 1) * cell_h, (s + 1) * cell_w)


def rise_mask(grid: np.ndarray, dy: int, dx: int, full_hw, hw) -> np.ndarray:
    """The RISE reference: resize(grid, (s+1)·cell, order=1, reflect)[dy:dy+H, dx:dx+W]."""
    big = up_reflect(grid.astype(np.float64), full_hw)
    return big[dy:dy + hw[0], dx:dx + hw[1]]


def rise(model: NaiveModel, x: np.ndarray, targets, n_masks: int, grid_size: int, p1: float, seed: int):
    H, W = x.shape[-2:]
    grids, dys, dxs, full_hw = rise_draws(n_masks, grid_size, p1, (H, W), seed)
    maps = np.zeros((len(targets), H, W))
    for i in range(n_masks):
        m = rise_mask(grids[i], int(dys[i]), int(dxs[i]), full_hw, (H, W))
        p = model.probs(masked(x, m))
        for t, c in enumerate(targets):
            maps[t] += p[c] * m
    return maps / (n_masks * p1)


def fem(acts: np.ndarray, hw, k: float = 1.0) -> np.ndarray:
    """up(min-max(Σ_k μ_k · [A_k ≥ μ_k + K·σ_k])), population σ, edge-clamped upsampling."""
    acts = np.asarray(acts, np.float64)
    r = np.zeros(acts.shape[1:])
    for ch in range(acts.shape[0]):
        a = acts[ch]
        mu = a.sum() / a.size
        sigma = np.sqrt(((a - mu) ** 2).sum() / a.size)
        r += mu * (a >= mu + k * sigma)
    return up_clamp(minmax(r), hw)
