"""torch → ONNX with outputs logits, probs and the activations of one layer."""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Union

from ..errors import InvalidInputError, ModelError, require
from .finalize import write_checked
from .layout import ActivationView, classify, has_positions, user_view
from .metadata import ModelMetadata, check_input_size, check_normalisation

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("logits", "probs", "activations")


def _module_outputs(model, example) -> list[tuple[str, int, tuple]]:
    """(module name, call index, output shape without batch) of every tensor-returning module call, in
    the order the calls finish. The call index handles modules reused within one forward."""
    torch = require("torch", "export", "exporting a torch model")
    calls: list[tuple[str, int, tuple]] = []
    seen: dict[str, int] = {}
    handles = []

    def hook(name):
        def fn(_module, _inputs, output):
            idx = seen.get(name, 0)
            seen[name] = idx + 1
            if isinstance(output, torch.Tensor):
                calls.append((name, idx, tuple(int(d) for d in output.shape[1:])))
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
    return calls


def find_activation_layer(model, example) -> tuple[str, int, ActivationView]:
    """(module name, call index, layout) of the last module whose output reads as a feature grid.

    That is a CNN's last feature map before global pooling (NCHW), a Swin-like model's last NHWC
    map, or a vision transformer's last token sequence (N, prefix + h·w, C) — never the patch
    embedding before it. A module output after the chosen one that still has positions but reads
    as none of these is refused (name the layer) rather than silently skipped.
    """
    input_hw = tuple(example.shape[2:])
    chosen, grids, later = None, [], []
    for name, idx, shape in _module_outputs(model, example):
        view = classify(shape, input_hw, grids)
        if view is not None:
            chosen, later = (name, idx, view), []
            if view.layout != "tokens":
                grids.insert(0, view.nchw_shape[1:])  # e.g. a patch embedding's grid, for later tokens
        elif chosen is not None and has_positions(shape):
            later.append(f"{name} {shape}")
    if chosen is None:
        raise ModelError("the model has no module whose output reads as a feature map (N, C, h, w), (N, h, w, C) "
                         "or patch tokens (N, tokens, C); name the layer to explain (layer=...), or export it as a "
                         "black box (with_activation=False: RISE and the metrics only)")
    if later:
        raise ModelError(f"after {chosen[0]} ({chosen[2].describe()}) the model has module outputs that are not a "
                         f"feature grid explainrt can read: {', '.join(later[:3])}; name the layer to explain "
                         "(layer=..., with grid=/prefix_tokens= for token tensors)")
    return chosen


def _to_nchw(torch, t, view: ActivationView):
    """The explained tensor as (N, C, h, w), traced into the exported graph."""
    if view.layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    if view.layout == "tokens":
        h, w = view.grid
        patches = t[:, view.prefix_tokens:view.prefix_tokens + h * w]
        return patches.transpose(1, 2).unflatten(2, (h, w))
    return t


def _wrap(model, layer: Optional[str], call_index: int, view: Optional[ActivationView]):
    torch = require("torch", "export", "exporting a torch model")

    class WithActivations(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self._target = None if layer is None else dict(model.named_modules())[layer]

        def forward(self, x):
            if self._target is None:  # black box: scores only
                logits = self.model(x)
                return logits, torch.softmax(logits, dim=1)
            captured = []
            handle = self._target.register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                logits = self.model(x)
            finally:
                handle.remove()
            return logits, torch.softmax(logits, dim=1), _to_nchw(torch, captured[call_index], view)

    return WithActivations()


def export_torch(model, path: str, input_size: Sequence[int] = (224, 224), layer: Union[str, Any, None] = None,
                 mean: Sequence[float] = (0.485 * 255, 0.456 * 255, 0.406 * 255),
                 std: Sequence[float] = (0.229 * 255, 0.224 * 255, 0.225 * 255),
                 labels: Optional[Sequence[str]] = None, name: Optional[str] = None, opset: int = 17,
                 grid: Optional[Sequence[int]] = None, prefix_tokens: Optional[int] = None,
                 with_activation: bool = True) -> ModelMetadata:
    """Export a torch classifier (returning logits) to ONNX with activation outputs and metadata.

    ``layer``: module name (``model.named_modules()``), or the module, whose output to explain; default
    the last module whose output is a feature grid (``find_activation_layer``: a CNN's last map before
    global pooling, a Swin-like NHWC map, a ViT's last patch tokens). Token tensors (N, L, C) become
    (N, C, h, w) inside the graph: ``prefix_tokens`` leading tokens (class, registers) dropped and the
    rest reshaped to ``grid`` (h, w); both are detected when not given. ``with_activation=False``
    exports a black-box model (scores only: RISE and the metrics apply). ``mean``/``std`` are RGB,
    0–255 scale. The batch axis is dynamic; opset ≥ 17.
    """
    torch = require("torch", "export", "exporting a torch model")
    check_normalisation(mean, std)
    if opset < 17:
        raise InvalidInputError(f"opset must be >= 17, got {opset}")
    h, w = check_input_size(input_size)
    model = model.eval()
    example = torch.zeros(1, 3, h, w)
    view = None
    if not with_activation:
        if layer is not None or grid is not None or prefix_tokens is not None:
            raise InvalidInputError("with_activation=False exports scores only: do not name a layer, grid or "
                                    "prefix_tokens")
        call_index = -1
    elif layer is None and grid is None and prefix_tokens is None:
        try:
            layer, call_index, view = find_activation_layer(model, example)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"the model does not run on a (1, 3, {h}, {w}) RGB batch: {exc}") from exc
    elif layer is None:
        raise InvalidInputError("grid/prefix_tokens describe the layer you name: give layer= too")
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
    if layer is not None and view is None:
        try:
            shapes = [shape for name_, _i, shape in _module_outputs(model, example) if name_ == layer]
        except Exception as exc:
            raise ModelError(f"the model does not run on a (1, 3, {h}, {w}) RGB batch: {exc}") from exc
        if not shapes:
            raise InvalidInputError(f"module {layer!r} returns no tensor in the model's forward; name another layer")
        view = user_view(shapes[call_index], (h, w), grid, prefix_tokens, f"layer {layer!r}")
    wrapped = _wrap(model, layer, call_index, view).eval()
    try:
        with torch.no_grad():
            logits = wrapped(example)[0]
    except Exception as exc:  # a model that does not take (1, 3, H, W) images
        raise ModelError(f"the model does not run on a (1, 3, {h}, {w}) RGB batch: {exc}") from exc
    if logits.dim() != 2:
        raise ModelError(f"the model's output has shape {tuple(logits.shape)}; expected logits (N, classes)")
    outputs = list(OUTPUT_NAMES) if with_activation else list(OUTPUT_NAMES[:2])
    axes = {n: {0: "batch"} for n in ("input", *outputs)}
    import warnings

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), tmp, input_names=["input"], output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)

    meta = ModelMetadata(
        input_name="input", input_size=(h, w), logits_output="logits", probs_output="probs",
        activation_output="activations" if with_activation else None,
        activation_shape=(0, 0, 0) if with_activation else None, num_classes=0,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        labels=list(labels) if labels is not None else None,
        activation_layer=None if layer is None else f"{layer}" if call_index in (0, -1) else f"{layer}#{call_index}",
        name=name or type(model).__name__, source="torch",
        **(view.metadata() if view is not None else {"activation_layout": None}),
    )
    return write_checked(path, meta, write)
