"""Files and JSON written per explanation (shared by `explainrt explain` and `explainrt client`)."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from .imaging import overlay, write_png

METHOD_ORDER = ("sidu", "scorecam", "rise", "fem", "featurecam")


def parse_methods(spec: str) -> list[str]:
    """'all' or a comma-separated list of method names, checked before any work starts."""
    from .errors import InvalidInputError
    from .explainers import METHODS

    methods = list(METHOD_ORDER) if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    methods = list(dict.fromkeys(methods))  # `sidu,fem,sidu` runs SIDU once
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InvalidInputError(f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}; "
                                f"choose from {', '.join(METHODS)} or 'all'")
    return methods


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def expand_image_dirs(paths: list[str]) -> list[str]:
    """``paths`` with each directory replaced by its image files (sorted by name); a directory
    without images is refused. Other paths are kept as they are (a missing file fails later, alone)."""
    from .errors import InvalidInputError

    images = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise InvalidInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in directory {path}")
            images.extend(found)
        else:
            images.append(path)
    return images


def output_stems(paths: list[str]) -> list[str]:
    """The file stem each image's outputs are named after; two images with one stem are refused
    (their outputs would overwrite each other)."""
    from .errors import InvalidInputError

    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    seen: dict[str, str] = {}
    for path, stem in zip(paths, stems):
        if stem in seen and seen[stem] != path:
            raise InvalidInputError(f"{seen[stem]} and {path} would both write {stem}.<method>.png/.npy into the "
                                    "output directory; rename one, or explain them in separate runs with other -o")
        seen[stem] = path
    return stems


def prepare_output_dir(path: str) -> str:
    """Create the output directory ``path`` now, before any work, or say why it cannot be."""
    from .errors import InvalidInputError

    if not path:
        raise InvalidInputError("the output directory is empty; pass -o DIR")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidInputError(f"output directory {path} is an existing file; pass -o with a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"cannot create the output directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise InvalidInputError(f"output directory {path} is not writable")
    return path


def prepare_output_file(path: str) -> str:
    """Check that the file ``path`` can be written (its directory is created), before any work."""
    from .errors import InvalidInputError

    if not path or os.path.isdir(path):
        raise InvalidInputError(f"output file {path!r} is {'a directory' if path else 'empty'}; give a file path")
    prepare_output_dir(os.path.dirname(os.path.abspath(path)))
    return path


def write_result_files(outdir: str, stem: str, method: str, saliency: np.ndarray, image: Optional[np.ndarray],
                       visualization: Optional[np.ndarray] = None, caption: Optional[str] = None,
                       target: Optional[int] = None) -> dict:
    """Write ``<stem>.<method>.npy`` (saliency) and ``<stem>.<method>.png`` (overlay at original size);
    with ``target`` (one of several classes explained) ``<stem>.<method>.<target>.npy|.png``.

    Feature CAM also writes its RGB visualisation as ``<stem>.featurecam.vis.png``. With a
    ``caption`` (see ``explainrt.figures.caption``) each PNG carries it below and a colour bar
    for the saliency scale on its right; without one the PNGs are the bare pictures.
    """
    from .figures import labelled

    os.makedirs(outdir, exist_ok=True)
    base = os.path.join(outdir, f"{stem}.{method}" + ("" if target is None else f".{target}"))
    np.save(base + ".npy", saliency.astype(np.float32))
    files = {"npy": base + ".npy"}

    def figure(picture: np.ndarray) -> np.ndarray:
        return picture if caption is None else labelled(picture, caption)

    if image is not None:
        write_png(base + ".png", figure(overlay(image, saliency)))
        files["png"] = base + ".png"
    if visualization is not None:
        import cv2

        vis = visualization
        if image is not None and vis.shape[:2] != image.shape[:2]:
            vis = cv2.resize(vis, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        write_png(base + ".vis.png", figure(vis))
        files["visualization"] = base + ".vis.png"
    return files


def write_targets(outdir: str, stem: str, method: str, targets, labels, probs, maps, image: Optional[np.ndarray],
                  visualization: Optional[np.ndarray], forward_passes: int, plain: bool = False) -> list[dict]:
    """``write_result_files`` for each explained class (``maps[i]`` of ``targets[i]``), captioned unless
    ``plain``; several classes are told apart by ``.<target>`` in the names. Feature CAM's visualisation
    (of the first class) goes with the first. The files per class, in order."""
    from .figures import caption

    several = len(targets) > 1
    return [write_result_files(outdir, stem, method, saliency, image, visualization if i == 0 else None,
                               caption=None if plain else caption(method, label, target, float(prob), forward_passes),
                               target=target if several else None)
            for i, (target, label, prob, saliency) in enumerate(zip(targets, labels, probs, maps))]


def result_record(image_name: str, method: str, target: int, label: str, prob: float, forward_passes: int,
                  seconds: float, files: dict, top: Optional[list] = None) -> dict:
    """The JSON object printed per (image, method) with --json."""
    return {"image": image_name, "method": method, "target": target, "label": label, "probability": round(prob, 6),
            "forward_passes": forward_passes, "seconds": round(seconds, 4), "files": files,
            **({"top_k": top} if top is not None else {})}


def result_line(image_name: str, method: str, target: int, label: str, prob: float, forward_passes: int,
                seconds: float, files: dict, saliency: Optional[np.ndarray] = None) -> str:
    """The one human-readable line printed per (image, method); a constant map says so."""
    where = files.get("png") or files.get("npy")
    line = (f"{image_name}: {label} ({target}) p={prob:.3f} | {method}: {forward_passes} forward passes "
            f"in {seconds:.2f} s -> {where}")
    if saliency is not None and float(saliency.max()) == float(saliency.min()):
        line += (" (constant map: the method found no evidence for this class, e.g. no activation above SIDU's "
                 "threshold or no positive weight; try another method or its parameters)")
    return line


def dumps(record: dict) -> str:
    return json.dumps(record, sort_keys=False)
