"""A real browser renders the demo's HTML report: headless Chromium (Debian's package,
installed by scripts/install.sh) takes a screenshot, which must not be blank, and the page
logs nothing to the console (Chromium writes every console message, errors included, as
"CONSOLE" lines to stderr with --enable-logging=stderr). A copy of the page with a probe
script also checks that every thumbnail loaded and that a filter hides what it should.

The run is the demo's flow (pipeline/demo.py's settings, its dataset generator,
run_videoqa) at a small size, with a random-weights tiny captioner in place of the demo's
trained one (training it takes minutes).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from captioner.random_weights import build_tiny_checkpoint
from pipeline.config import load_config
from pipeline.demo import demo_overrides
from pipeline.demo_data import generate_demo_dataset
from pipeline.run import run_videoqa
from qa.tiny import build_tiny_reader

SCREENSHOT_COPY = Path("/tmp/report_screenshot.png")
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\] (.*)")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return name
    pytest.skip("chromium is not installed (scripts/install.sh installs Debian's `chromium` "
                "with apt-get where apt-get exists)")


def _chrome(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}",
               "--allow-file-access-from-files", *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    return [m.group(1) for m in map(CONSOLE.search, stderr.splitlines()) if m]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    _chromium()  # skip before the run is built when there is no browser
    base = tmp_path_factory.mktemp("browser-run")
    models = base / "models"
    build_tiny_reader(models / "reader-tiny")
    captioner = build_tiny_checkpoint(base / "mmser-tiny", refine=True)
    root = generate_demo_dataset(base / "demo", num_videos=3, seconds=8.0, fps=5, width=160,
                                 height=120, seed=2)
    (root / "videos" / "demo-002.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 junk" * 10)
    overrides = demo_overrides(models, captioner) + [
        f"datasets.demo.root={root}", f"cache.dir={base / 'cache'}",
        f"outputs.runs_dir={base / 'runs'}", "captioner.generation.max_new_tokens=8",
        "reader.max_tokens=16", "sampling.resize=[64, 64]", "ray.enabled=false",
    ]
    return run_videoqa(load_config(overrides=overrides), "demo", "mmser")


def test_detector_sees_a_console_error(tmp_path: Path):
    """The console check itself: a page that throws must be caught by it on this Chromium."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>nope();</script></body></html>")
    result = _chrome(page.as_uri(), tmp_path / "profile", "--dump-dom")
    assert any("nope is not defined" in m for m in console_messages(result.stderr))


def test_chromium_renders_the_report_without_console_errors(demo_run: Path, tmp_path: Path):
    shot = tmp_path / "report.png"
    result = _chrome((demo_run / "report.html").as_uri(), tmp_path / "profile",
                     f"--screenshot={shot}", "--window-size=1280,2000",
                     "--hide-scrollbars")
    assert shot.exists(), result.stderr[-2000:]
    assert console_messages(result.stderr) == []
    shutil.copyfile(shot, SCREENSHOT_COPY)  # for a person to look at
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        non_white = sum(n for n, c in colours if sum(c) < 3 * 245)
    assert len(colours) > 200  # thumbnails, bars, text: far from a blank page
    assert non_white > 0.03 * rgb.width * rgb.height


PROBE = """<script>
window.addEventListener('load', function () {
  var broken = Array.prototype.filter.call(document.images, function (i) {
    return !(i.complete && i.naturalWidth > 0); });
  if (broken.length) { console.error('broken thumbnails: ' + broken.length); }
  var visible = function () { return Array.prototype.filter.call(
    document.querySelectorAll('section.video'), function (s) {
      return s.offsetParent !== null; }).length; };
  var before = visible();
  document.querySelector('input[data-filter="only-failures"]').click();
  var out = document.createElement('div'); out.id = 'probe';
  out.textContent = 'images=' + document.images.length + ' broken=' + broken.length +
    ' videos=' + before + ' failures-only=' + visible();
  document.body.appendChild(out);
});
</script>"""


def test_thumbnails_load_and_the_failure_filter_works(demo_run: Path, tmp_path: Path):
    probe = demo_run / "probe.html"  # beside report.html, so its relative thumbnails resolve
    probe.write_text((demo_run / "report.html").read_text().replace("</body>",
                                                                    PROBE + "</body>"))
    result = _chrome(probe.as_uri(), tmp_path / "profile", "--dump-dom",
                     "--virtual-time-budget=5000")
    probe.unlink()
    assert console_messages(result.stderr) == []
    found = re.search(r'<div id="probe">images=(\d+) broken=(\d+) videos=(\d+) '
                      r"failures-only=(\d+)</div>", result.stdout)
    assert found, result.stdout[-2000:]
    images, broken, videos, failures_only = map(int, found.groups())
    assert images > 0 and broken == 0
    assert videos == 3 and failures_only == 1  # demo-002 is corrupt
