"""The HTML report in a real browser: headless Chromium loads it without console errors, the
tables are in the DOM, hostile text stays text, and a screenshot shows a drawn page.

Chromium is the Debian package `chromium` (/usr/bin/chromium); the test skips
where it is absent. Every flag that would reach the network or a profile is off,
so the run depends on nothing but the file. The report has no JavaScript, so any
console message at all means something in it went wrong.
"""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from wallperf.audit.report import render_report
from test_report import AUDIT, HOSTILE, write_folder

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
WIDTH, HEIGHT = 1280, 2000


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    proc = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    return proc


def console_messages(stderr: str) -> list[str]:
    # Chromium logs every page console message as `:CONSOLE(n)]` or `:CONSOLE:n]`; dbus noise is not one.
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    cpu = write_folder(tmp, "cpu", model=HOSTILE, invalid_reason=HOSTILE, audit={**AUDIT, "reason": HOSTILE})
    h100 = write_folder(tmp, "h100", hardware="h100-sxm")
    path = tmp / "report.html"
    render_report([cpu, h100], path, None)
    return path


def test_the_report_loads_without_console_errors_and_has_its_tables(report, tmp_path):
    proc = chromium(tmp_path, "--dump-dom", report.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console_messages(proc.stderr) == []
    dom = proc.stdout
    assert dom.count('<table class="performance">') == 3  # Server, SingleStream, Offline
    for table_id in ("sources", "findings", "accuracy"):
        assert f'<table id="{table_id}">' in dom
    assert 'id="roofline-chart"' in dom and 'id="latency-chart"' in dom
    assert "<script" not in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_the_screenshot_shows_a_drawn_page(report, tmp_path):
    shot = tmp_path / "report.png"
    proc = chromium(tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", report.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    assert console_messages(proc.stderr) == []
    assert shot.stat().st_size > 50_000
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200, "the page looks blank or flat"
    # Content runs down the page: no band of a quarter of the height is one flat colour.
    rows_flat = np.all(pixels == pixels[:, :1], axis=(1, 2))
    longest_flat = max((len(run) for run in "".join("1" if f else "0" for f in rows_flat).split("0")), default=0)
    assert longest_flat < HEIGHT // 4
