"""Image decoding, preprocessing with the model's metadata, and heatmap overlays."""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Optional, Union

import cv2
import numpy as np

from .errors import InvalidInputError
from .export.metadata import ModelMetadata

ImageLike = Union[str, os.PathLike, np.ndarray, bytes]


@dataclasses.dataclass
class PreparedImage:
    """An engine-ready input plus the original picture it came from (if any)."""

    x: np.ndarray  # float32 (1, 3, H, W), normalised
    original: Optional[np.ndarray]  # uint8 RGB (h, w, 3) or None for preprocessed input
    name: str = "image"


class _QuietOpenCV:
    """OpenCV's log at ERROR while any thread decodes: a corrupt file is reported by our error
    alone, not also by a "[ WARN ] PNG input buffer is incomplete" line on stderr."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = None

    def __enter__(self):
        log = getattr(getattr(cv2, "utils", None), "logging", None)
        with self._lock:
            if log is not None and self._depth == 0:
                self._saved = log.getLogLevel()
                log.setLogLevel(min(self._saved, log.LOG_LEVEL_ERROR))
            self._depth += 1

    def __exit__(self, *exc):
        log = getattr(getattr(cv2, "utils", None), "logging", None)
        with self._lock:
            self._depth -= 1
            if log is not None and self._depth == 0 and self._saved is not None:
                log.setLogLevel(self._saved)


_quiet_opencv = _QuietOpenCV()


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode PNG/JPEG/... bytes to uint8 RGB; raises InvalidInputError if it is not an image."""
    buf = np.frombuffer(data, dtype=np.uint8)
    with _quiet_opencv:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise InvalidInputError(
            f"{name}: could not decode the image ({len(data)} bytes); it is corrupt or not in a "
            "format OpenCV reads (PNG, JPEG, BMP, TIFF, WebP)"
        )
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)  # in place: one H×W×3 copy, not two


def peek_image_size(data: bytes) -> Optional[tuple[int, int]]:
    """(H, W) read from a PNG or JPEG header without decoding; None for other formats or no header."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                i += 2
                continue
            length = int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            i += 2 + length
    return None


def check_image_path(path: Union[str, os.PathLike]) -> str:
    """``path`` as a string if it names a file; a clear error for a missing file or a directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InvalidInputError(f"{path} is a directory, not an image file")
    if not os.path.isfile(path):
        raise InvalidInputError(f"image file not found: {path}")
    return path


def read_image_bytes(path: Union[str, os.PathLike]) -> bytes:
    """The bytes of an image file, with a clear error for a missing file or a directory."""
    path = check_image_path(path)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an image file to uint8 RGB (H, W, 3)."""
    return decode_image(read_image_bytes(path), name=os.fspath(path))


def as_rgb_uint8(img: np.ndarray, name: str = "image") -> np.ndarray:
    """Accept H×W (grey), H×W×1, H×W×3 or H×W×4 uint8 arrays and return H×W×3 RGB."""
    if img.dtype != np.uint8:
        raise InvalidInputError(f"{name}: an H×W×3 image array must be uint8, got {img.dtype}")
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 4:
        return np.ascontiguousarray(img[:, :, :3])
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    raise InvalidInputError(
        f"{name}: expected an RGB image of shape (H, W, 3) (or H×W grey, H×W×4 RGBA), got shape {img.shape}"
    )


def normalise(rgb: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """Resize an RGB uint8 image to the model's input and normalise: float32 (1, 3, H, W)."""
    h, w = meta.input_size
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise InvalidInputError(f"image has no pixels (shape {rgb.shape})")
    shrinking = rgb.shape[0] > h or rgb.shape[1] > w
    resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    mean = np.asarray(meta.mean, np.float32)
    std = np.asarray(meta.std, np.float32)
    x = (resized.astype(np.float32) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


PREPROCESSED_LIMIT = 1e6  # |(pixel - mean) / std| of any sane normalisation is far below this


def check_preprocessed(x: np.ndarray, meta: ModelMetadata, name: str = "input") -> np.ndarray:
    """Validate an already-normalised float array (3,H,W) or (1,3,H,W) and return (1,3,H,W)."""
    given = tuple(x.shape)
    if x.ndim == 3:
        x = x[None]
    expected = (1, meta.channels, *meta.input_size)
    if x.ndim != 4 or tuple(x.shape) != expected:
        looks_like_image = len(given) == 3 and given[2] in (1, 3, 4) and given[0] not in (1, 3, 4)
        hint = (f" (it looks like an H×W×{given[2]} picture stored as {x.dtype}: pass it as uint8, e.g. "
                "(img * 255).round().astype(np.uint8) for values in [0, 1], and explainrt resizes and normalises it)"
                if looks_like_image else
                "; pass an H×W×3 uint8 image instead to let explainrt resize and normalise it")
        raise InvalidInputError(
            f"{name}: a float array is taken as preprocessed input and must have shape {expected[1:]} or "
            f"{expected}, got {given}{hint}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise InvalidInputError(f"{name}: the preprocessed array contains NaN or Inf values (as float32)")
    peak = float(np.abs(x).max())
    if peak > PREPROCESSED_LIMIT:
        raise InvalidInputError(
            f"{name}: the preprocessed array holds values up to {peak:.3g}; normalised pixels ((pixel - mean) / std) "
            f"stay far below {PREPROCESSED_LIMIT:g} — pass the uint8 image to let explainrt normalise it")
    return x


def prepare_image(image: ImageLike, meta: ModelMetadata, name: Optional[str] = None) -> PreparedImage:
    """Turn a path, encoded bytes, an RGB uint8 array or a preprocessed float array into engine input."""
    if isinstance(image, (str, os.PathLike)):
        rgb = read_image(image)
        return PreparedImage(normalise(rgb, meta), rgb, name or os.path.basename(os.fspath(image)))
    if isinstance(image, (bytes, bytearray, memoryview)):
        rgb = decode_image(bytes(image), name or "image bytes")
        return PreparedImage(normalise(rgb, meta), rgb, name or "image")
    if isinstance(image, np.ndarray):
        if np.issubdtype(image.dtype, np.floating):
            return PreparedImage(check_preprocessed(image, meta, name or "input"), None, name or "input")
        rgb = as_rgb_uint8(image, name or "image")
        return PreparedImage(normalise(rgb, meta), rgb, name or "image")
    raise InvalidInputError(
        f"unsupported image type {type(image).__name__}: pass a file path, encoded image bytes, an "
        "H×W×3 uint8 RGB array, or a preprocessed float32 array of shape (3,H,W)/(1,3,H,W)"
    )


def denormalise(x: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """Invert ``normalise`` (without the resize): (1,3,H,W) float → (H,W,3) uint8 RGB."""
    img = x[0].transpose(1, 2, 0) * np.asarray(meta.std, np.float32) + np.asarray(meta.mean, np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


_ROWS_PER_CHUNK_PIXELS = 1 << 20  # elementwise float work in slices of ~1 M pixels (4 MiB of float32)


def saliency_to_uint8(saliency: np.ndarray) -> np.ndarray:
    """A [0,1] float map as uint8 0..255 (NaN → 0, rounded half to even, clipped), ``saliency`` untouched.

    Converted in slices of rows, so a large map needs one uint8 copy plus ~4 MiB of float work,
    not several full-size float copies.
    """
    u8 = np.empty(saliency.shape, np.uint8)
    rows = max(1, _ROWS_PER_CHUNK_PIXELS // max(1, saliency.shape[-1] if saliency.ndim > 1 else 1))
    for r in range(0, saliency.shape[0], rows):
        part = np.nan_to_num(saliency[r:r + rows].astype(np.float32))  # a copy: the caller's map stays as it is
        part *= 255.0
        np.rint(part, out=part)
        np.clip(part, 0, 255, out=part)
        u8[r:r + rows] = part
    return u8


def colormap(saliency: np.ndarray) -> np.ndarray:
    """Map a [0,1] float map to a uint8 RGB JET heatmap."""
    heat = cv2.applyColorMap(saliency_to_uint8(saliency), cv2.COLORMAP_JET)
    return cv2.cvtColor(heat, cv2.COLOR_BGR2RGB, dst=heat)


def resize_map(saliency: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a float map to (H, W) as float32 (the input itself when already float32 at that size)."""
    h, w = size_hw
    if saliency.shape == (h, w):
        return saliency.astype(np.float32, copy=False)
    return cv2.resize(saliency.astype(np.float32, copy=False), (w, h), interpolation=cv2.INTER_LINEAR)


def _blend(image_rgb: np.ndarray, saliency: np.ndarray, alpha: float, bgr: bool) -> np.ndarray:
    """The JET heatmap of ``saliency`` blended over ``image_rgb`` at its size, RGB or BGR, in uint8 math.

    Peak extra memory: the resized float32 map (4 B/pixel) until it is uint8, then two uint8 H×W×3
    images (the heatmap, blended in place, and the image in the heatmap's channel order when that
    differs). ``cv2.addWeighted`` rounds like the float formula it replaces, within 1 level.
    """
    heat = cv2.applyColorMap(saliency_to_uint8(resize_map(saliency, image_rgb.shape[:2])), cv2.COLORMAP_JET)
    if bgr:
        image = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    else:
        image = image_rgb
        cv2.cvtColor(heat, cv2.COLOR_BGR2RGB, dst=heat)
    return cv2.addWeighted(image, 1.0 - alpha, heat, alpha, 0.0, dst=heat)


def overlay(image_rgb: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a JET heatmap of ``saliency`` over ``image_rgb`` at the image's own size (uint8 RGB)."""
    return _blend(as_rgb_uint8(image_rgb, "overlay image"), saliency, alpha, bgr=False)


def overlay_png(image_rgb: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> bytes:
    """``overlay`` encoded as PNG bytes, built in OpenCV's BGR order (no RGB copy to convert back)."""
    return _encode(".png", _blend(as_rgb_uint8(image_rgb, "overlay image"), saliency, alpha, bgr=True))


def png_size_bound(height: int, width: int, channels: int = 3) -> int:
    """An upper bound on the PNG file of an 8-bit ``height``×``width``×``channels`` image.

    PNG stores the raw rows with one filter byte each, deflated: deflate's worst case (stored blocks)
    adds 5 bytes per 16 KiB block at most, and zlib's own bound (``deflateBound``) is
    n + n/4096 + n/16384 + 13; libpng splits the stream into IDAT chunks of >= 8 KiB with 12 bytes of
    framing each. ``n + n/256 + 4096`` is above all of these together, whatever the pixels are.
    """
    raw = height * (width * channels + 1)
    return raw + raw // 256 + 4096


def write_png(path: Union[str, os.PathLike], rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG."""
    if not cv2.imwrite(os.fspath(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise InvalidInputError(f"could not write {path}")


def _encode(ext: str, bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, bgr)
    if not ok:
        raise InvalidInputError(f"could not encode {ext[1:].upper()}")
    return buf.tobytes()


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an RGB uint8 image as PNG bytes."""
    return _encode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
