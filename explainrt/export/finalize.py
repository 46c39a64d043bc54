"""The last step of every export: probe the file with ONNX Runtime, fill in and store metadata."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Callable

import numpy as np

from ..errors import ModelError
from . import cam_head
from .batch_rewrite import quiet_run, quiet_session
from .metadata import ModelMetadata, check_labels, write_metadata

log = logging.getLogger(__name__)


def write_checked(path: str, meta: ModelMetadata, write: Callable[[str], None]) -> ModelMetadata:
    """``write(tmp)`` the ONNX file beside ``path``, probe and complete it, then move it to ``path``.

    A failed export leaves no file behind (nor replaces an older good one at ``path``). The file
    gets the permissions the umask gives a new file (0644 under umask 0022), as ``torch.onnx.export``'s do.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        meta = probe_and_store(tmp, meta)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600; a file written with open() would follow the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("exported %s: activation %s %s (%s), %d classes", path, meta.activation_output, meta.activation_shape,
             meta.activation_layout, meta.num_classes)
    return meta


def _umask() -> int:
    """The process's umask (read by setting it, then put back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def probe_and_store(path: str, meta: ModelMetadata) -> ModelMetadata:
    """Run the ONNX file at ``path`` on a batch of 2, check its outputs, complete ``meta`` and save it.

    Checks that the batch axis is really dynamic (a model kept at ``meta.fixed_batch`` runs at
    that batch), the activation output (when there is one) is 4-D (N, C, h, w) and the
    probabilities are (N, K); fills ``activation_shape`` and ``num_classes``. ONNX Runtime's own
    log lines are kept quiet.
    """
    import onnx

    try:
        sess = quiet_session(path)
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load the exported model {path}: {exc}") from exc
    h, w = meta.input_size
    batch = meta.fixed_batch or 2
    x = np.zeros((batch, meta.channels, h, w), np.float32)
    names = [meta.probs_output] + ([meta.activation_output] if meta.has_activation else []) \
        + ([meta.logits_output] if meta.logits_output else [])
    try:
        outs = dict(zip(names, quiet_run(sess, names, {meta.input_name: x})))
    except Exception as exc:
        raise ModelError(
            f"the exported model does not run on a batch of {batch} ({exc}); explainrt needs a dynamic batch axis — "
            "a Reshape with a hard-coded batch of 1 is the usual cause (export with dynamic axes)"
        ) from exc
    probs = outs[meta.probs_output]
    if meta.has_activation:
        act = outs[meta.activation_output]
        if act.ndim != 4 or act.shape[0] != batch:
            raise ModelError(
                f"activation output '{meta.activation_output}' has shape {act.shape}; explainrt needs a convolutional "
                "activation (N, C, h, w) in NCHW layout — name a 4-D tensor before global pooling"
            )
        meta.activation_shape = tuple(int(d) for d in act.shape[1:])
    if probs.ndim != 2 or probs.shape[0] != batch:
        raise ModelError(f"class output '{meta.probs_output}' has shape {probs.shape}; expected (N, classes)")
    meta.num_classes = int(probs.shape[1])
    meta.labels = check_labels(meta.labels, meta.num_classes)
    meta.validate()
    model = onnx.load(path)
    meta.cam_head = cam_head.detect(model, meta)  # forward-only gradient CAMs where the head allows
    write_metadata(model, meta)
    onnx.save(model, path)
    return meta
