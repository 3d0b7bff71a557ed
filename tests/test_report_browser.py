"""The demo's report.html in a real browser: headless Chromium (Debian package `chromium`)
opens it from disk, its sections are in the DOM, every embedded image decoded, and a
full-page screenshot shows real content.

"Images loaded" is read from the browser itself: the test opens a copy of the page with a
small load-event script that marks each <img> with complete && naturalWidth > 0, plus one
deliberately broken image that must come out marked as not loaded (so the check can fail).
The report itself has no scripts.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from tests.demo_helpers import REPO, get_demo_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)"),
    pytest.mark.slow,  # it needs the short demo run (tests/demo_helpers.py)
    pytest.mark.ci,  # an acceptance check: CI runs it despite being slow
]

SECTIONS = ["summary", "configuration", "data", "training", "exercises", "benchmarks", "samples", "timings"]
MARK_IMAGES = """<img id="control-broken" src="data:image/png;base64,bm90IGEgcG5n" alt="control">
<script>window.addEventListener('load', function () {
  var im = document.images;
  for (var i = 0; i < im.length; i++) {
    im[i].setAttribute('data-loaded', (im[i].complete && im[i].naturalWidth > 0) ? 'yes' : 'no');
    im[i].setAttribute('data-natural-width', String(im[i].naturalWidth));
  }
  document.body.setAttribute('data-checked', 'yes');
});</script>"""


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    bench = REPO.parent / "shared" / "benchmarks"
    return get_demo_run(tmp_path_factory, bench if bench.is_dir() else None)


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_report_sections_and_images_load_in_chromium(demo_run, tmp_path):
    page = (demo_run.out / "report.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", MARK_IMAGES + "</body>"))
    proc = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", checked.as_uri())
    dom = proc.stdout
    assert proc.returncode == 0 and 'data-checked="yes"' in dom, proc.stderr[-2000:]
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom, section
    imgs = re.findall(r"<img\b[^>]*>", dom)
    control = [i for i in imgs if 'id="control-broken"' in i]
    report_imgs = [i for i in imgs if 'id="control-broken"' not in i]
    assert control and 'data-loaded="no"' in control[0]  # the check does catch a broken image
    assert len(report_imgs) == 3  # loss curves, throughput, exercise accuracy
    for img in report_imgs:
        assert 'data-loaded="yes"' in img, img[:200]
        assert int(re.search(r'data-natural-width="(\d+)"', img).group(1)) > 300


def test_report_screenshot_is_not_blank(demo_run, tmp_path):
    from PIL import Image  # matplotlib's own dependency

    shot = tmp_path / "report.png"
    proc = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4000",
                    (demo_run.out / "report.html").as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape == (4000, 1280, 3)
    ink = (pixels.sum(-1) < 600).mean()  # share of pixels clearly darker than white/background
    colors = len(np.unique(pixels.reshape(-1, 3)[::7], axis=0))
    assert ink > 0.01 and colors > 200, (ink, colors)
    # the plots' colours are on the page: the loss curve blue and the validation orange
    blue = ((abs(pixels[..., 0] - 0x21) < 25) & (abs(pixels[..., 1] - 0x71) < 25) & (abs(pixels[..., 2] - 0xB5) < 25))
    orange = ((abs(pixels[..., 0] - 0xE6) < 25) & (abs(pixels[..., 1] - 0x55) < 25) & (abs(pixels[..., 2] - 0x0D) < 25))
    assert blue.sum() > 200 and orange.sum() > 100
