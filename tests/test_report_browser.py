"""The report in a real browser: headless Chromium opens index.html, every figure loads
(naturalWidth > 0), no console error, and a screenshot is kept.

Needs Debian's ``chromium`` (``apt-get install chromium``): skipped with that reason where it
is missing, a failure when ``CI=true`` (``.ci/run`` installs it). The screenshot goes to
``$AUTOML_TL_ARTIFACTS`` (CI keeps that folder) or the test's temporary folder; the test
prints where.

Chromium runs the page as a user's browser would. To read what the page saw, the test opens a
copy of index.html with a small probe script first in ``<head>``: it records console errors
and uncaught errors, and after ``load`` writes the state of every ``<img>`` into the DOM,
which ``--dump-dom`` prints. The report's own file is not changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from automl_tl.report import build_report

from .test_report import _make_study

PROBE = """<script>
window.__errors = [];
(function () {
  const error = console.error.bind(console);
  console.error = function (...args) { window.__errors.push(args.map(String).join(" ")); error(...args); };
  window.addEventListener("error", (e) => {
    window.__errors.push("uncaught: " + (e.message || (e.target && (e.target.src || e.target.href)) || e.type));
  }, true);
  window.addEventListener("unhandledrejection", (e) => window.__errors.push("rejection: " + e.reason));
  window.addEventListener("load", () => {
    const images = Array.from(document.images).map((img) => ({
      alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
    }));
    const out = document.createElement("pre");
    out.id = "__probe";
    out.textContent = JSON.stringify({
      images: images, errors: window.__errors, title: document.title,
      height: document.body.scrollHeight, tables: document.querySelectorAll("table").length,
    });
    document.body.appendChild(out);
  });
})();
</script>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(browser: str, *args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # containers run tests as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--allow-file-access-from-files",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={home / 'profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(home)},
    )


@pytest.fixture(scope="module")
def browser():
    found = _chromium()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "CI=true but chromium is missing: .ci/run installs it (apt-get install chromium)"
            )
        pytest.skip(
            "chromium is not installed (apt-get install chromium); the report's browser check is skipped"
        )
    return found


def test_index_html_renders_in_chromium_with_every_figure_loaded(tmp_path, registry, browser):
    config, splits = _make_study(tmp_path / "study", registry)
    # the selection section too: the race's table and the single model scored on test
    from automl_tl.selection import Selection, score_model

    chosen = Selection(
        winner=1,
        argmax=1,
        rule="mean",
        finalists=[
            {
                "trial": 1,
                "value": 0.95,
                "scores": [0.95, 0.9],
                "mean": 0.925,
                "lcb": 0.9,
                "standard_error": 0.025,
                "best_epochs": [3, 2],
                "params": {},
                "run_seconds": 1.0,
            },
            {
                "trial": 0,
                "value": 0.8,
                "scores": [0.8, 0.85],
                "mean": 0.825,
                "lcb": 0.8,
                "standard_error": 0.025,
                "best_epochs": [3, 3],
                "params": {},
                "run_seconds": 1.0,
            },
        ],
        standard_error=0.02,
        val_images=108,
        folds=0,
        repeats=1,
        budget=20,
        runs=2,
        run_seconds=2.0,
        epochs=None,
        temperature=None,
        notes=["a note"],
    )
    single = score_model(config.paths.best, splits)
    (config.paths.root / "selection.json").write_text(
        json.dumps({"selection": chosen.to_dict(), "single": single})
    )
    report = build_report(config, registry)
    assert 'id="selection"' in report.index.read_text()
    assert report.skipped == []
    probe_page = report.directory / ".probe-index.html"
    page = report.index.read_text()
    probe_page.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    home = tmp_path / "home"
    home.mkdir()
    dom = _run(browser, "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri(), home=home)
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'<pre id="__probe">(.*?)</pre>', dom.stdout, flags=re.DOTALL)
    assert match, f"the page never finished loading; chromium said: {dom.stderr[-2000:]}"
    state = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert state["title"] == f"automl-tl report: {config.name}"
    assert state["tables"] >= 3 and state["height"] > 1000  # leaderboard, race, models
    figures = [f for f in report.files if f.written]
    assert len(state["images"]) >= len(figures)
    broken = [i for i in state["images"] if not (i["complete"] and i["naturalWidth"] > 0)]
    assert broken == [], f"images that did not load: {broken}"
    assert state["errors"] == []
    console = [
        line
        for line in dom.stderr.splitlines()
        if "CONSOLE" in line and ("ERROR" in line or ":ERROR:" in line) and "__probe" not in line
    ]
    assert console == []
    # the screenshot of the report itself (not the probe copy), kept for CI
    artifacts = Path(os.environ.get("AUTOML_TL_ARTIFACTS") or tmp_path / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report-index.png"
    taken = _run(
        browser,
        f"--screenshot={shot}",
        "--window-size=1280,2400",
        "--hide-scrollbars",
        report.index.as_uri(),
        home=home,
    )
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        # not a blank page: more than a few colours
        assert len(image.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 50
    print(f"\nreport screenshot: {shot}")
    probe_page.unlink()
