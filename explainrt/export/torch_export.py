"""torch → ONNX with outputs logits, probs and the activations of one layer."""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Union

from ..errors import InvalidInputError, ModelError, require
from .finalize import write_checked
from .metadata import ModelMetadata, check_input_size, check_normalisation

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("logits", "probs", "activations")


def find_activation_layer(model, example) -> tuple[str, int]:
    """(module name, call index) of the last module whose output is 4-D with h·w > 1.

    That is the last convolutional feature map before global pooling. The call index handles
    modules reused within one forward (e.g. a shared activation function).
    """
    torch = require("torch", "export", "exporting a torch model")
    calls: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    handles = []

    def hook(name):
        def fn(_module, _inputs, output):
            idx = seen.get(name, 0)
            seen[name] = idx + 1
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
                calls.append((name, idx))
        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise ModelError("the model has no module with a 4-D output (N, C, h, w) with h·w > 1; name the layer to explain")
    return calls[-1]


def _wrap(model, layer: str, call_index: int):
    torch = require("torch", "export", "exporting a torch model")

    class WithActivations(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self._target = dict(model.named_modules())[layer]

        def forward(self, x):
            captured = []
            handle = self._target.register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                logits = self.model(x)
            finally:
                handle.remove()
            return logits, torch.softmax(logits, dim=1), captured[call_index]

    return WithActivations()


def export_torch(model, path: str, input_size: Sequence[int] = (224, 224), layer: Union[str, Any, None] = None,
                 mean: Sequence[float] = (0.485 * 255, 0.456 * 255, 0.406 * 255),
                 std: Sequence[float] = (0.229 * 255, 0.224 * 255, 0.225 * 255),
                 labels: Optional[Sequence[str]] = None, name: Optional[str] = None, opset: int = 17) -> ModelMetadata:
    """Export a torch classifier (returning logits) to ONNX with activation outputs and metadata.

    ``layer``: module name (``model.named_modules()``), or the module, whose output to explain; default the
    last module with a 4-D output before global pooling. ``mean``/``std`` are RGB, 0–255
    scale. The batch axis is dynamic; opset ≥ 17.
    """
    torch = require("torch", "export", "exporting a torch model")
    check_normalisation(mean, std)
    if opset < 17:
        raise InvalidInputError(f"opset must be >= 17, got {opset}")
    h, w = check_input_size(input_size)
    model = model.eval()
    example = torch.zeros(1, 3, h, w)
    if layer is None:
        try:
            layer, call_index = find_activation_layer(model, example)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"the model does not run on a (1, 3, {h}, {w}) RGB batch: {exc}") from exc
    else:
        modules = dict(model.named_modules())
        if not isinstance(layer, str):  # the module itself
            named = [n for n, m in modules.items() if m is layer]
            if not named:
                raise InvalidInputError(f"layer must be a module name (see model.named_modules()) or one of the "
                                        f"model's modules; got a {type(layer).__name__} that is not in the model")
            layer = named[-1]
        if layer not in modules:
            near = [n for n in modules if n and layer.split(".")[-1] in n][:5]
            raise InvalidInputError(f"model has no module named {layer!r}" + (f"; similar: {near}" if near else ""))
        call_index = -1
    wrapped = _wrap(model, layer, call_index).eval()
    try:
        with torch.no_grad():
            logits = wrapped(example)[0]
    except Exception as exc:  # a model that does not take (1, 3, H, W) images
        raise ModelError(f"the model does not run on a (1, 3, {h}, {w}) RGB batch: {exc}") from exc
    if logits.dim() != 2:
        raise ModelError(f"the model's output has shape {tuple(logits.shape)}; expected logits (N, classes)")
    axes = {n: {0: "batch"} for n in ("input", *OUTPUT_NAMES)}
    import warnings

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), tmp, input_names=["input"], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)

    meta = ModelMetadata(
        input_name="input", input_size=(h, w), logits_output="logits", probs_output="probs",
        activation_output="activations", activation_shape=(0, 0, 0), num_classes=0,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        labels=list(labels) if labels is not None else None,
        activation_layer=f"{layer}" if call_index in (0, -1) else f"{layer}#{call_index}",
        name=name or type(model).__name__, source="torch",
    )
    return write_checked(path, meta, write)
