"""``report.html`` opened in headless Chromium (issue 7).

Skipped, with a message, only when no Chromium/Chrome executable is found
(CI installs it: see ``.ci/run``).  The page is rendered twice: ``--dump-dom``
to read the DOM after the load event (the report's script counts the figures
that decoded) and ``--screenshot`` to check that something was painted.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import redirect_stdout
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from subriemann.app.cli import main

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--virtual-time-budget=10000",
)


def _browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _browser()
    if path is None:
        pytest.skip("Chromium not found (looked for " + ", ".join(BROWSERS) + "); install it, "
                    "e.g. apt-get install chromium, to check report.html in a browser")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "report"
    argv = ["run", "--data", "teacher", "--model", "mlp:6", "--n-samples", "5", "--s-end", "0.4",
            "--metrics", "euclidean,pullback", "--rtol", "1e-7", "--no-progress", "--out", str(out)]
    with redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    return out / "report.html"


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=180,
            env={**os.environ, "HOME": profile},
        )


class _Table(HTMLParser):
    """Rows and cells of ``<table id="flows">`` and the ``<img>`` sources."""

    def __init__(self) -> None:
        super().__init__()
        self.in_table = False
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "flows":
            self.in_table = True
        elif self.in_table and tag == "tr":
            self.rows.append([])
        elif self.in_table and tag in ("td", "th"):
            self.cell = []
        elif tag == "img":
            self.images.append(a.get("src") or "")

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_table = False
        elif tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def test_report_dom_in_chromium(chromium, report):
    proc = _chromium(chromium, "--dump-dom", report.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "<h1>subriemann report</h1>" in dom
    # every figure decoded in the browser (set by the page's load handler)
    m = re.search(r'data-images-loaded="(\d+)"', dom)
    assert m is not None, "the page's load handler did not run"
    assert int(m.group(1)) == 4
    page = _Table()
    page.feed(dom)
    header, *rows = page.rows
    assert header[:3] == ["flow", "λ", "status"]
    assert [r[0] for r in rows] == ["euclidean", "pullback"]
    assert all(r[2] == "s_end_reached" for r in rows)
    assert len(page.images) == 4
    assert all(src.startswith("data:image/png;base64,") for src in page.images)


def test_report_screenshot_in_chromium(chromium, report, tmp_path):
    shot = tmp_path / "shot.png"
    proc = _chromium(chromium, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 20_000
    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (2400, 1280)
    # painted: not a uniform page, and the figures (coloured curves) are visible
    assert float(np.std(img[..., :3])) > 0.05
    rgb = img[..., :3]
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert float((saturation > 0.3).mean()) > 1e-3
