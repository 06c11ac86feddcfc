"""``report.html`` opened in headless Chromium (issues 7 and 14).

Skipped, with a message, only when no Chromium/Chrome executable is found
(CI installs it: see ``.ci/run``).  Each page (an MSE run and a cross-entropy
run) is rendered twice: ``--dump-dom`` to read the DOM after the load event
(the report's script counts the figures that decoded) and ``--screenshot`` to
check that something was painted.  The cross-entropy page must show the
cross-entropy predictions (docs/theory.md §6), not placeholders.
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


def _run(out: Path, *args: str) -> Path:
    argv = ["run", "--model", "mlp:6", "--s-end", "0.4", "--metrics", "euclidean,pullback",
            "--rtol", "1e-7", "--no-progress", "--out", str(out), *args]
    with redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    return out / "report.html"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("html") / "report", "--data", "teacher",
                "--n-samples", "5")


@pytest.fixture(scope="module")
def ce_report(tmp_path_factory) -> Path:
    """Cross-entropy, 6 samples of 3 classes (integer labels, one-hot), smoothed with 0.2."""
    folder = tmp_path_factory.mktemp("ce")
    rng = np.random.default_rng(1)
    np.savez(folder / "three.npz", inputs=rng.normal(size=(6, 2)),
             targets=np.array([0, 1, 2, 0, 1, 2]))
    return _run(folder / "report", "--data", str(folder / "three.npz"), "--loss",
                "cross_entropy", "--label-smoothing", "0.2")


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=180,
            env={**os.environ, "HOME": profile},
        )


class _Table(HTMLParser):
    """Rows and cells of ``<table id="...">`` (default ``flows``) and the ``<img>`` sources."""

    def __init__(self, table: str = "flows") -> None:
        super().__init__()
        self.table = table
        self.in_table = False
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None
        self.images: list[str] = []
        self.captions: dict[str, str] = {}
        self.figure: str | None = None
        self.text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.figure = (a.get("id") or "").removeprefix("fig-")
        elif tag == "figcaption":
            self.text = []
        if tag == "table" and a.get("id") == self.table:
            self.in_table = True
        elif self.in_table and tag == "tr":
            self.rows.append([])
        elif self.in_table and tag in ("td", "th"):
            self.cell = []
        elif tag == "img":
            self.images.append(a.get("src") or "")

    def handle_endtag(self, tag):
        if tag == "figcaption" and self.text is not None and self.figure is not None:
            self.captions[self.figure] = "".join(self.text)
            self.text = None
        if tag == "table":
            self.in_table = False
        elif tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.text is not None:
            self.text.append(data)


def _dom(browser: str, page: Path) -> str:
    proc = _chromium(browser, "--dump-dom", page.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "<h1>subriemann report</h1>" in dom
    # every figure decoded in the browser (set by the page's load handler)
    m = re.search(r'data-images-loaded="(\d+)"', dom)
    assert m is not None, "the page's load handler did not run"
    assert int(m.group(1)) == 4
    # the reference list, with the arXiv numbers of the papers the captions cite
    for num in ("2408.01517", "2311.15487", "2509.23887"):
        assert f"arXiv:{num}" in dom
    assert "MATH.md" not in dom
    return dom


def test_ce_summary_numbers(ce_report):
    """C*, μ and the hyperplane drift of the cross-entropy report against closed forms."""
    import json

    summary = json.loads((ce_report.parent / "summary.json").read_text())
    eps, q, n = 0.2, 3, 6
    p = np.array([1 - eps + eps / q] + [eps / q] * (q - 1))  # a smoothed one-hot label
    cstar = -n * float((p * np.log(p)).sum())  # N H(y_j)
    ce = summary["problem"]["cross_entropy"]
    assert ce["finite_limit"] and ce["minimum_cost"] == pytest.approx(cstar, rel=1e-12)
    # mu = eps / Q for smoothed one-hot labels with Q >= 3 (docs/theory.md §6); eigvalsh: 1e-15
    assert ce["mu"] == pytest.approx(eps / q, abs=1e-12)
    for f in summary["flows"]:
        x = np.load(ce_report.parent / f["trajectory"])["outputs"].reshape(-1, n, q)
        drift = np.abs(x.sum(-1) - x[0].sum(-1)).max()
        assert f["cross_entropy"]["hyperplane_drift"] == pytest.approx(drift, rel=1e-12)
        assert f["decay_rate"]["minimum_cost"] == pytest.approx(cstar, rel=1e-12)
    # the adapted flow keeps its hyperplanes, the standard flow does not
    euclid, pull = summary["flows"]
    assert pull["cross_entropy"]["hyperplane_drift"] < 1e-3 * euclid["cross_entropy"][
        "hyperplane_drift"]


def test_report_dom_in_chromium(chromium, report):
    dom = _dom(chromium, report)
    page = _Table()
    page.feed(dom)
    header, *rows = page.rows
    assert header[:3] == ["flow", "λ", "status"]
    assert [r[0] for r in rows] == ["euclidean", "pullback"]
    assert all(r[2] == "s_end_reached" for r in rows)
    assert len(page.images) == 4
    assert all(src.startswith("data:image/png;base64,") for src in page.images)


def test_ce_report_dom_in_chromium(chromium, ce_report):
    """The cross-entropy page shows its own figures, captions and verdicts (docs/theory.md §6)."""
    dom = _dom(chromium, ce_report)
    page = _Table("verdicts")
    page.feed(dom)
    assert set(page.captions) == {"cost", "limit_distance", "singular_values", "hyperplane_sums"}
    caps = page.captions
    assert "C(s) − C*" in caps["cost"] and "Dashed black: slope −2μ" in caps["cost"]
    assert "|x(s) − x*|" in caps["limit_distance"] and "slope −μ" in caps["limit_distance"]
    assert "⟨1, x_j(s)⟩" in caps["hyperplane_sums"] and "all 6" in caps["hyperplane_sums"]
    assert "τ = rank_rtol·σ_max" in caps["singular_values"]
    placeholders = ("Nothing drawn", "No paths drawn", "No deviation computed", "No flows")
    assert not any(p in c for c in caps.values() for p in placeholders)
    header, *rows = page.rows
    assert header[:3] == ["flow", "prediction", "docs/theory.md"]
    col = {h: i for i, h in enumerate(header)}
    verdicts = {(r[0], r[col["prediction"]]): r[col["outcome"]] for r in rows}
    assert {r[col["docs/theory.md"]] for r in rows} == {"§2", "§6"}
    assert verdicts[("pullback", "hyperplane sums ⟨1, x_j⟩ constant")] == "held"
    assert verdicts[("pullback", "C non-increasing")] == "held"
    assert verdicts[("euclidean", "drift of the hyperplane sums ⟨1, x_j⟩")] == "no prediction"
    # s_end = 0.4 is far from the late-time regime: said so, with the s_end that would do
    assert verdicts[("pullback", "late-time rate of x → x* on 1⊥ = μ")] == "not checked"


@pytest.mark.parametrize("which", ["report", "ce_report"])
def test_report_screenshot_in_chromium(chromium, which, request, tmp_path):
    page = request.getfixturevalue(which)
    shot = tmp_path / "shot.png"
    proc = _chromium(chromium, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 20_000
    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (2400, 1280)
    # painted: not a uniform page, and the figures (coloured curves) are visible
    assert float(np.std(img[..., :3])) > 0.05
    rgb = img[..., :3]
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert float((saturation > 0.3).mean()) > 1e-3
