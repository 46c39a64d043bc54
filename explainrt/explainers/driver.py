"""The one batched driver: dedupe, chunking, masked batches into the engine, scores back.

Every method's masked passes go through ``run_masked_passes``. It is written against the
array namespace (``ctx.xp``/``ctx.ops``) so the GPU engines reuse it unchanged. The chunk
loop and its staging buffers are ``runtime.staging.run_in_chunks`` (shared with
``Engine.infer_batches`` and the metrics): each chunk's masked images are written straight
into the engine's input buffer. On a GPU nothing in the loop waits on the device: index
arrays are uploaded once (before the first chunk is written, which the staging's stream
handshake relies on), scores stay on the device, and two input buffers let the masking of
chunk k+1 overlap the engine on k.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import numpy as np

from ..errors import ExplainRTError
from ..kernels import to_host
from ..runtime.staging import run_in_chunks
from .base import Context, MaskPlan, ScoreTable

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


class Cancelled(ExplainRTError):
    """The request was cancelled (or its deadline passed) between two chunks."""


def dedupe_binary(xp, masks):
    """Distinct rows of binary masks in first-occurrence order: (unique_idx, inverse, counts)."""
    n = masks.shape[0]
    flat = to_host(xp, masks.reshape(n, -1))
    packed = np.packbits(flat.astype(bool), axis=1)
    _, first, inverse, counts = np.unique(packed, axis=0, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(first, kind="stable")  # renumber rows by first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order], rank[inverse.reshape(-1)], counts[order]


def run_masked_passes(ctx: Context, plan: MaskPlan, progress: Optional[ProgressFn] = None,
                      cancel: Optional[threading.Event] = None) -> ScoreTable:
    """Run every distinct mask of ``plan`` through the engine in chunks of ``ctx.batch_size``."""
    xp, ops, engine, meta = ctx.xp, ctx.ops, ctx.engine, ctx.engine.metadata
    n = plan.count
    if plan.binary:
        first, inverse, counts = dedupe_binary(xp, plan.masks)
        # A mask that is 1 everywhere leaves the input unchanged: its scores are the base pass's.
        ones = to_host(xp, plan.masks[first].reshape(first.size, -1).min(axis=1)) >= 1.0
    else:
        first, inverse, counts = np.arange(n), np.arange(n), np.ones(n, np.int64)
        ones = np.zeros(n, dtype=bool)
    run_rows = np.flatnonzero(~ones)
    want_logits = meta.logits_output is not None
    names = [meta.probs_output] + ([meta.logits_output] if want_logits else [])
    classes = int(ctx.base.probs.shape[0])
    probs = xp.empty((first.size, classes), dtype=xp.float32)
    logits = xp.empty((first.size, classes), dtype=xp.float32) if want_logits else None
    if ones.any():
        reused = xp.asarray(np.flatnonzero(ones))
        probs[reused] = ctx.base.probs
        if want_logits:
            logits[reused] = ctx.base.logits
    total = int(run_rows.size)
    c, (H, W) = ctx.x.shape[1], ctx.input_hw
    # Index arrays go to the engine's device once, not once per chunk (before the first write).
    rows_x, idx_x = xp.asarray(run_rows), xp.asarray(first[run_rows])
    if progress:
        progress(0, total)

    def before_chunk(done: int) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after {done} of {total} masked passes")

    def write(buffer, start: int, b: int) -> None:
        idx = idx_x[start:start + b]
        ops.masked_batch(
            ctx.x, plan.masks[idx], out=buffer, border=plan.border,
            shift=None if plan.shift is None else plan.shift[idx],
            scale=None if plan.scale is None else plan.scale[idx],
            full_hw=plan.full_hw, offsets=None if plan.offsets is None else plan.offsets[idx],
        )

    def take(start: int, b: int, out: dict) -> None:
        rows = rows_x[start:start + b]
        probs[rows] = out[meta.probs_output]
        if want_logits:
            logits[rows] = out[meta.logits_output]
        if progress:
            progress(start + b, total)

    run_in_chunks(engine, total, ctx.batch_size, (c, H, W), write, names, take, before_chunk)
    ctx.forward_passes += total
    log.debug("ran %d masked passes for %d masks (%d distinct)", total, n, first.size)
    return ScoreTable(probs, logits, inverse, counts, first)


def run_inputs(ctx: Context, inputs) -> dict:
    """Run a few whole inputs (N, C, H, W) through the engine in chunks (e.g. baselines)."""
    meta = ctx.engine.metadata
    names = [meta.probs_output] + ([meta.logits_output] if meta.logits_output else [])
    ctx.forward_passes += int(inputs.shape[0])
    return ctx.engine.infer_batches(inputs, names, ctx.batch_size)
