"""Figures a person reads on their own: an overlay with its caption (method, class, probability)
and a colour bar for the saliency scale, drawn with OpenCV (no plotting library needed)."""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from .imaging import as_rgb_uint8, colormap

#: how each method is named in captions
METHOD_TITLES = {"sidu": "SIDU", "scorecam": "Score-CAM", "rise": "RISE", "fem": "FEM", "featurecam": "Feature CAM",
                 "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM", "layercam": "LayerCAM",
                 "fgvis": "FGVis"}

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_INK = (20, 20, 20)
_PAPER = 255


def method_title(method: str) -> str:
    """The method's name as written in papers (SIDU, Score-CAM, …); unknown names unchanged."""
    return METHOD_TITLES.get(method, method)


def caption(method: str, label: str, target: int, probability: float, forward_passes: Optional[int] = None) -> str:
    """The one-line caption of an overlay: ``Score-CAM | Egyptian cat (285) p=0.781 | 517 passes``."""
    text = f"{method_title(method)} | {label} ({target}) p={probability:.3f}"
    return text + (f" | {forward_passes} passes" if forward_passes is not None else "")


def _ascii(text: str) -> str:
    # OpenCV's Hershey fonts draw ASCII only; anything else would come out as '?' boxes anyway.
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


def _fit_text(text: str, width: int, scale: float, thickness: int) -> tuple[str, float]:
    """``text`` at the largest scale <= ``scale`` (down to 0.3) that fits ``width``; cut with '...' below that."""
    while scale > 0.3 and cv2.getTextSize(text, _FONT, scale, thickness)[0][0] > width:
        scale -= 0.05
    while len(text) > 4 and cv2.getTextSize(text, _FONT, scale, thickness)[0][0] > width:
        text = text[:-4] + "..."
    return text, scale


def labelled(picture_rgb: np.ndarray, text: str) -> np.ndarray:
    """``picture_rgb`` (an overlay at any size) with a JET colour bar (saliency 0 to 1) on its right
    and ``text`` in a strip below; uint8 RGB, a few percent larger than the picture.

    Pictures under 240 px on their longer side are enlarged (nearest neighbour) first, so the text
    stays legible.
    """
    picture = as_rgb_uint8(picture_rgb, "figure")
    h, w = picture.shape[:2]
    if max(h, w) < 240:
        f = int(np.ceil(240 / max(h, w)))
        picture = cv2.resize(picture, (w * f, h * f), interpolation=cv2.INTER_NEAREST)
        h, w = picture.shape[:2]
    unit = max(h, w) / 600.0  # text and bar scale with the picture
    scale, thick = float(np.clip(0.6 * unit, 0.4, 1.4)), max(1, int(round(unit)))
    pad = max(4, int(8 * unit))
    bar_w = max(10, int(18 * unit))
    tick_w = cv2.getTextSize("1.0", _FONT, scale * 0.8, thick)[0][0]
    text_h = cv2.getTextSize("Ag", _FONT, scale, thick)[0][1]
    strip_h = text_h * 2 + 2 * pad
    canvas = np.full((h + strip_h, w + 3 * pad + bar_w + tick_w, 3), _PAPER, np.uint8)
    canvas[:h, :w] = picture

    bar_top, bar_bottom = pad, h - pad
    ramp = np.linspace(1.0, 0.0, max(2, bar_bottom - bar_top), dtype=np.float32)[:, None]
    x0 = w + pad
    canvas[bar_top:bar_bottom, x0:x0 + bar_w] = colormap(np.repeat(ramp, bar_w, axis=1))
    cv2.rectangle(canvas, (x0, bar_top), (x0 + bar_w - 1, bar_bottom - 1), _INK, 1)
    tick_h = cv2.getTextSize("0", _FONT, scale * 0.8, thick)[0][1]
    for value, y in (("1.0", bar_top + tick_h), ("0.5", (bar_top + bar_bottom + tick_h) // 2), ("0.0", bar_bottom)):
        cv2.putText(canvas, value, (x0 + bar_w + pad // 2, y), _FONT, scale * 0.8, _INK, thick, cv2.LINE_AA)

    line, fitted = _fit_text(_ascii(text), canvas.shape[1] - 2 * pad, scale, thick)
    cv2.putText(canvas, line, (pad, h + pad + int(text_h * 1.5)), _FONT, fitted, _INK, thick, cv2.LINE_AA)
    return canvas
