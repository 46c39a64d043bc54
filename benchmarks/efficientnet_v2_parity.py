"""EfficientNet-V2-S: is the ORT-vs-torch gap on random weights an export defect or ill-conditioning?

For torchvision's efficientnet_v2_s with (a) its random initialisation and (b) the same weights
with BatchNorm statistics recalibrated on 32 random images (what training leaves behind: each
BN normalises its input), compares ONNX Runtime and torch float32 with torch float64 as the
reference: relative max error (max |a − b| / max |b|) of the logits and the explained
activation, and the activations' magnitude; and the elementwise relative error max |a − b|/|b|,
which near-zero values blow up. If ORT and torch float32 are equally far from
float64, the export is exact and the gap is float32 rounding amplified by the network.
Prints a table and writes benchmarks/out/efficientnet_v2_parity.json.

    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/efficientnet_v2_parity.py
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from explainrt.export import export_torch  # noqa: E402
from explainrt.metrics.base import format_rows  # noqa: E402
from explainrt.runtime.ort_engine import OnnxRuntimeEngine  # noqa: E402


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-300))


def elementwise_relative_error(got, want) -> float:
    """max |a − b| / |b| over elements: blows up where |b| is near 0 (how a 1e-2 'error' can appear)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float((np.abs(got - want) / np.maximum(np.abs(want), 1e-30)).max())


def main() -> int:
    import torch
    import torchvision

    torch.set_num_threads(1)
    torch.manual_seed(0)
    random_init = torchvision.models.efficientnet_v2_s(weights=None).eval()
    calibrated = copy.deepcopy(random_init).train()
    with torch.no_grad():  # BN running statistics from data: momentum None = cumulative average
        for m in calibrated.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for seed in range(4):
            calibrated(torch.from_numpy(np.random.default_rng(100 + seed).standard_normal((8, 3, 224, 224))
                                        .astype(np.float32)))
    calibrated.eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    rows, report = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in (("random init", random_init), ("BN recalibrated", calibrated)):
            path = os.path.join(tmp, "m.onnx")
            meta = export_torch(model, path, input_size=(224, 224))
            ort = OnnxRuntimeEngine(path, max_batch=2).infer(x)
            captured = {}
            layer = dict(model.named_modules())[meta.activation_layer]
            handle = layer.register_forward_hook(lambda _m, _i, out: captured.__setitem__("act", out.detach()))
            with torch.no_grad():
                logits32 = model(torch.from_numpy(x)).numpy()
                act32 = captured["act"].numpy()
                model64 = copy.deepcopy(model).double()
                layer64 = dict(model64.named_modules())[meta.activation_layer]
                handle.remove()
                handle = layer64.register_forward_hook(lambda _m, _i, out: captured.__setitem__("act", out.detach()))
                logits64 = model64(torch.from_numpy(x).double()).numpy()
                act64 = captured["act"].numpy()
            handle.remove()
            entry = {
                "tensor": meta.activation_layer,
                "activation_max_abs": float(np.abs(act64).max()), "logits_max_abs": float(np.abs(logits64).max()),
                "ort_vs_torch32_logits": relative_error(ort[meta.logits_output], logits32),
                "ort_vs_torch32_activation": relative_error(ort[meta.activation_output], act32),
                "ort_vs_float64_logits": relative_error(ort[meta.logits_output], logits64),
                "torch32_vs_float64_logits": relative_error(logits32, logits64),
                "ort_vs_float64_activation": relative_error(ort[meta.activation_output], act64),
                "torch32_vs_float64_activation": relative_error(act32, act64),
                "ort_vs_torch32_logits_elementwise": elementwise_relative_error(ort[meta.logits_output], logits32),
                "ort_vs_torch32_activation_elementwise": elementwise_relative_error(ort[meta.activation_output],
                                                                                    act32),
            }
            report[label] = entry
            rows.append([label, f"{entry['activation_max_abs']:.2e}", f"{entry['ort_vs_torch32_logits']:.1e}",
                         f"{entry['ort_vs_torch32_activation']:.1e}", f"{entry['ort_vs_float64_logits']:.1e}",
                         f"{entry['torch32_vs_float64_logits']:.1e}", f"{entry['ort_vs_float64_activation']:.1e}",
                         f"{entry['torch32_vs_float64_activation']:.1e}",
                         f"{entry['ort_vs_torch32_logits_elementwise']:.1e}",
                         f"{entry['ort_vs_torch32_activation_elementwise']:.1e}"])
    print(f"efficientnet_v2_s, tensor {report['random init']['tensor']}, torch {torch.__version__}")
    print(format_rows(["weights", "|act| max", "ORT vs torch32 logits", "… act", "ORT vs f64 logits",
                       "torch32 vs f64 logits", "ORT vs f64 act", "torch32 vs f64 act",
                       "elementwise ORT vs torch32 logits", "… act"], rows))
    out = os.path.join(REPO, "benchmarks", "out", "efficientnet_v2_parity.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
