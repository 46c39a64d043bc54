"""A real headless Chromium, driven through chromedriver's WebDriver HTTP API (urllib, no selenium).

``open_page(path)`` loads a local file and returns what the tests check: every ``<img>`` with its
``naturalWidth``, the browser console's messages, and a screenshot (PNG bytes). Chromium runs with
no network features (no background networking, sync, component updates, QUIC) and a fresh profile.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1800")


def missing() -> Optional[str]:
    """Why no browser test can run here (None when Chromium and chromedriver are installed)."""
    if not any(shutil.which(n) for n in CHROMIUM_NAMES):
        return "Chromium is not installed (Debian: apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "chromedriver is not installed (Debian: apt-get install chromium-driver)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Driver:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body: Optional[dict] = None, timeout: float = 60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"{}").get("value")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"chromedriver {method} {path}: {exc.read().decode(errors='replace')[:500]}") from None


def open_page(path: os.PathLike, timeout: float = 60) -> dict:
    """Load ``path`` (a local HTML file) in headless Chromium and report what it shows.

    Returns ``{"images": [{"src", "complete", "naturalWidth"}], "console": [{"level", "message"}],
    "screenshot": PNG bytes, "title": str}``.
    """
    chromium = next(shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n))
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="explainrt-chromium-")
    proc = subprocess.Popen([shutil.which("chromedriver"), f"--port={port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    driver = _Driver(port)
    session = None
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                if (driver.call("GET", "/status", timeout=5) or {}).get("ready"):
                    break
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": chromium, "args": [*FLAGS, f"--user-data-dir={profile}"]}}
        session = driver.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}}, timeout=timeout)["sessionId"]
        s = f"/session/{session}"
        driver.call("POST", s + "/url", {"url": Path(path).resolve().as_uri()}, timeout=timeout)
        driver.call("POST", s + "/execute/async", {"script": """
            const done = arguments[arguments.length - 1];
            const wait = () => [...document.images].every(i => i.complete) ? done() : setTimeout(wait, 50);
            wait();""", "args": []}, timeout=timeout)
        images = driver.call("POST", s + "/execute/sync", {"script": """
            return [...document.images].map(i => ({src: i.getAttribute('src').slice(0, 80), complete: i.complete,
                                                   naturalWidth: i.naturalWidth}));""", "args": []})
        console = driver.call("POST", s + "/se/log", {"type": "browser"}) or []
        title = driver.call("GET", s + "/title")
        shot = base64.b64decode(driver.call("GET", s + "/screenshot"))
        return {"images": images, "console": [{"level": c["level"], "message": c["message"]} for c in console],
                "screenshot": shot, "title": title}
    finally:
        if session is not None:
            try:
                driver.call("DELETE", f"/session/{session}", timeout=20)
            except (OSError, RuntimeError):
                pass
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
