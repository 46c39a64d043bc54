"""What a user looks at: labelled overlays, index.html (checked in a real headless Chromium), the
demo's photographs, and the command line's handling of targets, methods and directories."""
from __future__ import annotations

import html.parser
import json
import os

import cv2
import numpy as np
import pytest

from tests import browser
from tests.conftest import random_rgb, write_image
from tests.test_cli import run_cli


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs["src"])
        for key in ("href", "src"):
            if attrs.get(key):
                self.links.append(attrs[key])


def page_images(index: str) -> _Images:
    parser = _Images()
    with open(index, encoding="utf-8") as fh:
        parser.feed(fh.read())
    return parser


def assert_self_contained(index: str) -> list[str]:
    """Every link is a data: URI or a file beside index.html; nothing names the network."""
    page = page_images(index)
    root = os.path.dirname(index)
    for link in page.links:
        assert not link.startswith(("http:", "https:", "//")), link
        if not link.startswith("data:"):
            from urllib.parse import unquote

            assert os.path.isfile(os.path.join(root, unquote(link))), link
    return page.srcs


def is_jet_red(px) -> bool:
    r, g, b = (int(v) for v in px)
    return r > 100 and g < 60 and b < 60


def is_jet_blue(px) -> bool:
    r, g, b = (int(v) for v in px)
    return b > 100 and r < 60 and g < 60


def test_labelled_figure_has_caption_and_colour_bar():
    from explainrt.figures import caption, labelled

    picture = np.full((300, 400, 3), 128, np.uint8)
    fig = labelled(picture, caption("scorecam", "Egyptian cat", 285, 0.781, 517))
    h, w = fig.shape[:2]
    assert h > 300 and w > 400
    np.testing.assert_array_equal(fig[:300, :400], picture)  # the picture itself is untouched
    strip = fig[300:]
    assert (strip.min(axis=2) < 80).sum() > 200  # dark text in the caption strip
    bar = fig[:300, 400:]  # the colour bar: JET red at the top (1.0), blue at the bottom (0.0)
    cols = [c for c in range(bar.shape[1]) if is_jet_red(bar[20, c])]
    assert cols and is_jet_blue(bar[280, cols[0]])
    assert caption("scorecam", "Egyptian cat", 285, 0.781, 517) == "Score-CAM | Egyptian cat (285) p=0.781 | 517 passes"


def test_explain_writes_labelled_overlays_plain_and_index(tiny_model, tmp_path):
    img = write_image(tmp_path / "pic.png", random_rgb(300, 260))
    out = tmp_path / "out"
    proc = run_cli("explain", "--model", tiny_model[1], img, "-o", str(out), "--method", "fem,featurecam",
                   "-p", "featurecam.base=fem")
    assert "browse" in proc.stdout and (out / "index.html").exists()
    for name in ("pic.fem.png", "pic.featurecam.png", "pic.featurecam.vis.png"):
        fig = cv2.imread(str(out / name))
        assert fig.shape[0] > 300 and fig.shape[1] > 260, name  # caption strip and colour bar added
    srcs = assert_self_contained(str(out / "index.html"))
    assert srcs[0].startswith("data:image/png;base64,") and srcs[1:] == ["pic.fem.png", "pic.featurecam.png"]

    plain = tmp_path / "plain"
    run_cli("explain", "--model", tiny_model[1], img, "-o", str(plain), "--method", "fem", "--plain")
    assert cv2.imread(str(plain / "pic.fem.png")).shape == (300, 260, 3)


def test_explain_default_method_is_sidu_and_takes_a_directory(tiny_model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "b.png", random_rgb(32, 32, seed=1))
    write_image(folder / "a.bmp", random_rgb(32, 32, seed=2))
    (folder / "notes.txt").write_text("not an image")
    proc = run_cli("explain", "--model", tiny_model[1], str(folder), "-o", str(tmp_path / "o"), "--json")
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(os.path.basename(r["image"]), r["method"]) for r in records] == [("a.bmp", "sidu"), ("b.png", "sidu")]
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("explain", "--model", tiny_model[1], str(empty), check=False)
    assert proc.returncode == 2 and "no images" in proc.stderr


def test_several_targets_by_index_list_and_label(tiny_model, tmp_path):
    from explainrt import Explainer

    img = write_image(tmp_path / "a.png", random_rgb(32, 32))
    out = tmp_path / "o"
    proc = run_cli("explain", "--model", tiny_model[1], img, "-o", str(out), "--method", "fem", "--json",
                   "--target", "1,3", "--target", "THING4", "--target", "3")
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["target"], r["label"]) for r in records] == [(1, "thing1"), (3, "thing3"), (4, "thing4")]
    want = Explainer(tiny_model[1]).explain(img, "fem", target=[1, 3, 4])
    for i, t in enumerate((1, 3, 4)):
        np.testing.assert_allclose(np.load(out / f"a.fem.{t}.npy"), want.saliency_maps[i], atol=1e-6)
        assert records[i]["probability"] == pytest.approx(float(want.probs[t]), abs=1e-6)
    for bad, message in (("nothing", "neither a class index nor a label"), ("1,,2", "neither a class index"),
                         ("7", "out of range")):
        proc = run_cli("explain", "--model", tiny_model[1], img, "-o", str(out), "--target", bad, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_repeated_method_runs_once_and_unused_parameter_warns(tiny_model, tmp_path):
    img = write_image(tmp_path / "a.png", random_rgb(32, 32))
    proc = run_cli("explain", "--model", tiny_model[1], img, "-o", str(tmp_path / "o"), "--json",
                   "--method", "fem,sidu,fem", "-p", "rise.n_masks=10", "-p", "threshold=0.2")
    assert [json.loads(line)["method"] for line in proc.stdout.splitlines()] == ["fem", "sidu"]
    assert "-p rise.n_masks is ignored: rise is not among the methods run (fem, sidu)" in proc.stderr
    assert "threshold" not in proc.stderr  # SIDU takes it
    proc = run_cli("explain", "--model", tiny_model[1], img, "-o", str(tmp_path / "o"), "--method", "fem",
                   "-p", "threshold=0.2")
    assert "-p threshold is ignored: none of the methods run (fem) takes it" in proc.stderr


def test_version_and_help():
    from explainrt import __version__

    assert run_cli("--version").stdout.strip() == f"explainrt {__version__}"
    top = run_cli("--help").stdout
    assert "explainrt demo" in top and "METHOD.NAME=VALUE" in top
    explain = run_cli("explain", "--help").stdout
    assert "default: sidu" in explain and "engine that runs the model" in explain and "METHOD.NAME=VALUE" in explain
    assert "motorcycle_left" in run_cli("demo", "--help").stdout


def test_demo_photographs_are_classified_right(lite0):
    """The demo shows photographs the demo model gets right (each a distinct ImageNet class)."""
    from explainrt import Explainer
    from explainrt.cli import DEMO_IMAGES
    from explainrt.metrics.bench import sample_image

    pytest.importorskip("skimage")
    explainer = Explainer(lite0[1])
    want = {"chelsea": "Egyptian cat", "coffee": "espresso", "motorcycle_left": "moped", "camera": "tripod"}
    assert set(DEMO_IMAGES) == set(want)
    for name in DEMO_IMAGES:
        probs = explainer.predict(sample_image(name))
        assert explainer.metadata.label(int(np.argmax(probs))) == want[name], name


# ---- a real browser ----------------------------------------------------------------------------------

needs_browser = pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))


def assert_page_displays(index: str, expected_images: int, screenshot=None) -> dict:
    shown = browser.open_page(index)
    problems = [c for c in shown["console"] if c["level"] in ("SEVERE", "WARNING")]
    assert problems == [], problems
    assert len(shown["images"]) == expected_images
    assert all(i["complete"] and i["naturalWidth"] > 0 for i in shown["images"]), shown["images"]
    shot = cv2.imdecode(np.frombuffer(shown["screenshot"], np.uint8), cv2.IMREAD_COLOR)
    assert shot is not None and shot.shape[0] > 100 and (shot.std(axis=(0, 1)) > 10).all()  # not a blank page
    if screenshot is not None:
        screenshot.write_bytes(shown["screenshot"])
    return shown


@needs_browser
def test_browser_shows_explain_index(tiny_model, tmp_path):
    out = tmp_path / "out"
    for seed, name in ((0, "one.png"), (1, "two words.png")):  # a space: links must be URL-quoted
        write_image(tmp_path / name, random_rgb(60, 80, seed=seed))
    run_cli("explain", "--model", tiny_model[1], str(tmp_path / "one.png"), str(tmp_path / "two words.png"),
            "-o", str(out), "--method", "fem,sidu", "-p", "n_masks=10")
    shown = assert_page_displays(str(out / "index.html"), expected_images=2 * 3, screenshot=tmp_path / "shot.png")
    assert shown["title"].startswith("explainrt explain")


@needs_browser
def test_browser_check_catches_a_missing_image(tmp_path):
    """The browser check can fail: a page whose image is missing shows naturalWidth 0 and a console error."""
    page = tmp_path / "index.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head>'
                    '<body><img src="gone.png"></body></html>')
    shown = browser.open_page(str(page))
    assert shown["images"][0]["naturalWidth"] == 0
    assert any(c["level"] == "SEVERE" and "gone.png" in c["message"] for c in shown["console"])


@needs_browser
def test_browser_shows_eval_index(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    images = tmp_path / "imgs"
    images.mkdir()
    for seed in range(2):
        write_image(images / f"i{seed}.png", random_rgb(32, 32, seed=seed))
    out = tmp_path / "eval"
    run_cli("eval", "--model", tiny_model[1], str(images), "--methods", "fem,sidu", "-o", str(out), "--step", "64",
            "--no-progress")
    srcs = assert_self_contained(str(out / "index.html"))
    assert "curves.png" in srcs and "maps/i0.fem.png" in srcs
    text = (out / "index.html").read_text()
    assert "insertion AUC" in text and "deletion↓" in text
    assert_page_displays(str(out / "index.html"), expected_images=2 * 3 + 1)


def test_demo_runs_fewer_rise_masks_says_so_and_times_its_steps(tiny_model, tmp_path):
    pytest.importorskip("skimage")
    out = tmp_path / "demo"
    proc = run_cli("demo", "--model", tiny_model[1], "--images", "chelsea", "--method", "rise,fem", "-o", str(out),
                   "--no-progress")
    assert "RISE runs 500 masks in the demo (its default is 4000" in proc.stderr
    assert "rise: 501 forward passes" in proc.stdout
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("demo: done in ") and "photos" in summary and "2 explanations" in summary
    assert "rise " in summary and "fem " in summary and "export" not in summary  # the model was there already
    assert (out / "index.html").exists() and (out / "images" / "chelsea.png").exists()
    proc = run_cli("demo", "--model", tiny_model[1], "--images", "chelsea", "--method", "rise", "-o", str(out),
                   "--no-progress", "-p", "n_masks=20")
    assert "rise: 21 forward passes" in proc.stdout and "500 masks" not in proc.stderr  # the user's own count wins
