"""Other libraries' implementations ("peers") run on the same torch model, for `explainrt bench --compare`.

Peers need the framework model with hooks, so they run on the built-in zoo models, whose
torch module explainrt can build. pytorch-grad-cam's ScoreCAM is the reference peer: it runs
every channel (no constant-channel skip), at ``cam.batch_size`` images per eager call, with
a host sync per score; its weights are a softmax over channels of the *logits* and its masks
are upsampled with align_corners=True (explainrt: ``score='logit', channel_softmax=True``
is the same weighting).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import logging
import sys
import time
import types
from typing import Callable, Optional

import numpy as np

from ..errors import ExplainRTError, InvalidInputError, require

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Peer:
    """One peer implementation: its package, the explainrt method it is timed against, and a runner."""

    name: str
    module: str  # import name that must be present
    package: str  # pip name
    ours: str  # explainrt method it is compared with
    note: str
    make: Callable  # (torch_model, target_layer, batch_size) -> run(input_tensor, target) -> (H, W) map

    def missing(self) -> Optional[str]:
        """None when the peer imports, else why not (e.g. "No module named 'torchvision'")."""
        if importlib.util.find_spec(self.module.split(".")[0]) is None:
            return f"No module named '{self.module}'"
        try:
            importlib.import_module(self.module)  # installed but broken (e.g. grad-cam without torchvision)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
            return f"{type(exc).__name__}: {exc}"
        return None

    def available(self) -> bool:
        return self.missing() is None


def _gradcam(cls_name: str, **kwargs):
    def make(model, layer, batch_size):
        cams = require("pytorch_grad_cam", "bench", "the pytorch-grad-cam comparison")
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = getattr(cams, cls_name)(model=model, target_layers=[layer], **kwargs)
        cam.batch_size = int(batch_size)  # ScoreCAM reads this hidden attribute (default 16)

        def run(x, target):
            return np.asarray(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(target))])[0], np.float32)

        return run

    return make


def _captum_occlusion(model, layer, batch_size):
    attr = require("captum.attr", "bench", "the Captum comparison")
    occlusion = attr.Occlusion(model)

    def run(x, target):
        out = occlusion.attribute(x, target=int(target), sliding_window_shapes=(3, 32, 32), strides=(3, 16, 16),
                                  baselines=0, perturbations_per_eval=int(batch_size))
        return out[0].sum(0).detach().cpu().numpy().astype(np.float32)

    return run


PEERS = (
    Peer("grad-cam ScoreCAM", "pytorch_grad_cam", "grad-cam", "scorecam",
         "all channels, softmax of logits over channels, align_corners=True", _gradcam("ScoreCAM")),
    Peer("grad-cam FEM", "pytorch_grad_cam", "grad-cam", "fem",
         "a different FEM: raw activations weighted by the fraction above mean+2σ", _gradcam("FEM")),
    Peer("captum Occlusion", "captum", "captum", "rise",
         "32×32 windows, stride 16 (169 passes); a different black-box method", _captum_occlusion),
)


def lite0_with_head_activation(model):
    """EfficientNet-Lite0 whose head ReLU6 is its own module ``head_act`` (returned with the model).

    The package's model applies one shared ``_swish`` module in the stem and the head, so a
    hook on it fires twice per forward; peers hook ``head_act`` instead. Same logits.
    """
    torch = require("torch", "export", "the torch peers")
    if not hasattr(model, "_conv_head") or not isinstance(getattr(model, "_swish", None), torch.nn.ReLU6):
        raise InvalidInputError("expected efficientnet_lite_pytorch's EfficientNet-Lite (ReLU6 activations)")
    model.head_act = torch.nn.ReLU6()

    def extract_features(self, inputs):
        # efficientnet_lite_pytorch's EfficientNet.extract_features with the head's activation swapped
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for idx, block in enumerate(self._blocks):
            rate = self._global_params.drop_connect_rate
            if rate:
                rate *= float(idx) / len(self._blocks)
            x = block(x, drop_connect_rate=rate)
        return self.head_act(self._bn1(self._conv_head(x)))

    model.extract_features = types.MethodType(extract_features, model)
    return model, model.head_act


#: zoo name -> function (torch model) -> (model, layer the exported ONNX explains)
ZOO_LAYERS = {"efficientnet-lite0": lite0_with_head_activation}


def zoo_torch_model(name: str):
    """The zoo model as a torch module plus its explained layer (as a separate module), checked."""
    from ..export.zoo import ZOO

    if name not in ZOO or name not in ZOO_LAYERS:
        raise InvalidInputError(f"no torch peer model for {name!r}; built-in models: {', '.join(ZOO_LAYERS)}")
    torch = require("torch", "export", "the torch peers")
    reference = ZOO[name]()
    model, layer = ZOO_LAYERS[name](ZOO[name]())
    probe = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(reference(probe), model(probe)):
            raise ExplainRTError(f"the peer copy of {name} does not reproduce the model's logits")
    return model.eval(), layer


class PassCounter:
    """Counts images through a torch module (a forward pre-hook adds each call's batch size)."""

    def __init__(self, model):
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, _module, inputs):
        self.count += int(inputs[0].shape[0])

    def close(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def quiet_peer_bars(quiet: bool = True):
    """While active (and ``quiet``), pytorch-grad-cam's own tqdm bars (Score-CAM's "for batch in
    tqdm.tqdm(...)") are disabled: its modules' ``tqdm`` name is swapped for one whose bars are off."""
    swapped = []
    if quiet:
        import tqdm as real

        off = types.SimpleNamespace(**{**vars(real), "tqdm": functools.partial(real.tqdm, disable=True)})
        for name, module in list(sys.modules.items()):
            if name.startswith("pytorch_grad_cam") and getattr(module, "tqdm", None) is real:
                swapped.append(module)
                module.tqdm = off
    try:
        yield
    finally:
        for module in swapped:
            module.tqdm = real


def time_peer(peer: Peer, model, layer, x: np.ndarray, target: int, batch_size: int = 32,
              warmup: int = 1, repeat: int = 3) -> dict:
    """Latencies (s), forward passes per call and the last map of ``peer`` on input x (1, 3, H, W).

    One plain forward of a ``batch_size`` batch warms torch up first (cheap), then ``warmup``
    whole untimed runs (a pytorch-grad-cam ScoreCAM run takes about a minute on 2 cores).
    """
    torch = require("torch", "export", "the torch peers")
    run = peer.make(model, layer, batch_size)
    tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.no_grad():
        model(tensor.expand(int(batch_size), *tensor.shape[1:]).contiguous())
    counter = PassCounter(model)
    try:
        for _ in range(warmup):
            run(tensor, target)
        counter.count = 0
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            saliency = run(tensor, target)
            times.append(time.perf_counter() - t0)
        passes = counter.count // max(repeat, 1)
    finally:
        counter.close()
    return {"times": times, "forward_passes": passes, "saliency": saliency}
