"""``index.html``: one page to browse a run of `explain`, `demo` or `eval`.

The page is self-contained: no scripts, no fonts or styles from the network; the original
photographs are inlined as small PNG thumbnails (data: URIs) and the overlays, written beside
``index.html``, are linked by relative paths, so the output directory can be moved or zipped.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import os
import urllib.parse
from typing import Iterable, Mapping, Optional, Sequence

import cv2
import numpy as np

from .figures import method_title
from .imaging import encode_png

THUMBNAIL_PX = 320  # the inlined originals' longer side

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
p.note { margin: 0.2em 0; color: #444; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 6px; vertical-align: top; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0; }
figure img { max-width: 230px; max-height: 230px; display: block; }
figcaption { font-size: 0.85em; color: #333; margin-top: 4px; }
img.plot { max-width: 100%; }
"""


@dataclasses.dataclass
class ReportItem:
    """One explanation shown on the page: (image, class, method) and what it cost."""

    name: str  # the image's name (its file stem)
    method: str
    target: int
    label: str
    probability: float
    forward_passes: int
    seconds: float
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)  # from write_result_files
    details: Mapping[str, str] = dataclasses.field(default_factory=dict)  # more lines for the cell (eval scores)


def data_uri_png(rgb: np.ndarray, longest: int = THUMBNAIL_PX) -> str:
    """``rgb`` shrunk to at most ``longest`` px on its longer side, as a ``data:image/png`` URI."""
    h, w = rgb.shape[:2]
    if max(h, w) > longest:
        f = longest / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return "data:image/png;base64," + base64.b64encode(encode_png(rgb)).decode("ascii")


def _link(path: str, outdir: str) -> str:
    return urllib.parse.quote(os.path.relpath(path, outdir).replace(os.sep, "/"))


def _cell(item: ReportItem, outdir: str) -> str:
    e = html.escape
    lines = [f"{item.forward_passes} forward passes, {item.seconds:.2f} s"]
    lines += [f"{e(k)}: {e(v)}" for k, v in item.details.items()]
    picture = ""
    if item.files.get("png"):
        alt = f"{method_title(item.method)} overlay of {item.name} for {item.label}"
        picture = f'<a href="{_link(item.files["png"], outdir)}"><img src="{_link(item.files["png"], outdir)}" ' \
                  f'alt="{e(alt)}"></a>'
    if item.files.get("visualization"):
        lines.append(f'<a href="{_link(item.files["visualization"], outdir)}">visualisation</a>')
    return f"<td><figure>{picture}<figcaption>{'<br>'.join(lines)}</figcaption></figure></td>"


def rows_html(items: Sequence[ReportItem], outdir: str, originals: Mapping[str, np.ndarray]) -> str:
    """The table: a row per (image, class), a column per method, the original first."""
    e = html.escape
    methods = list(dict.fromkeys(i.method for i in items))
    rows: dict[tuple[str, int], dict[str, ReportItem]] = {}
    for item in items:
        rows.setdefault((item.name, item.target), {})[item.method] = item
    head = "".join(f"<th>{e(method_title(m))}</th>" for m in methods)
    body = []
    for (name, target), cells in rows.items():
        first = next(iter(cells.values()))
        original = originals.get(name)
        picture = f'<img src="{data_uri_png(original)}" alt="{e(name)}">' if original is not None else ""
        body.append(f"<tr><td><figure>{picture}<figcaption><b>{e(name)}</b><br>{e(first.label)} ({target})<br>"
                    f"p = {first.probability:.3f}</figcaption></figure></td>"
                    + "".join(_cell(cells[m], outdir) if m in cells else "<td></td>" for m in methods) + "</tr>")
    return f"<table><tr><th>image, class, probability</th>{head}</tr>{''.join(body)}</table>"


def table_html(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain HTML table of strings (numbers right-aligned)."""
    e = html.escape

    def cell(v: str) -> str:
        numeric = v.replace(".", "", 1).replace("±", "").replace(" ", "").replace("-", "").isdigit()
        return f'<td class="num">{e(v)}</td>' if numeric else f"<td>{e(v)}</td>"

    return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(cell(str(v)) for v in row) + "</tr>" for row in rows) + "</table>")


def write_index(outdir: str, title: str, items: Sequence[ReportItem] = (),
                originals: Optional[Mapping[str, np.ndarray]] = None, notes: Sequence[str] = (),
                sections: Sequence[tuple[str, str]] = ()) -> str:
    """Write ``<outdir>/index.html`` and return its path.

    ``items``: the explanations (their files relative to ``outdir``); ``originals``: the RGB
    photograph per image name, inlined as thumbnails; ``notes``: lines of text under the title;
    ``sections``: (heading, HTML) blocks before the table, e.g. eval's summary and curves.
    """
    e = html.escape
    parts = [f"<h1>{e(title)}</h1>"] + [f'<p class="note">{e(n)}</p>' for n in notes]
    for heading, block in sections:
        parts.append(f"<h2>{e(heading)}</h2>{block}")
    if items:
        parts.append((f"<h2>{e('Each image')}</h2>" if sections else "") + rows_html(items, outdir, originals or {}))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{e(title)}</title>"
            f"<link rel=\"icon\" href=\"data:,\"><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    path = os.path.join(outdir, "index.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return path


def image_link(path: str, outdir: str, alt: str) -> str:
    """An ``<img>`` of a file in (or under) ``outdir``, linked relatively."""
    return f'<img class="plot" src="{_link(path, outdir)}" alt="{html.escape(alt)}">'
