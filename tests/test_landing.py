"""The landing page and the per-process page, served by the real daemon watching real
workloads, read as HTML and as screenshots taken by headless Chromium (Debian's `chromium`,
installed by tests/setup/chromium.sh).

The page is fetched once, checked as HTML, and that same HTML is what Chromium renders: the
score of a live process moves from one second to the next, so the screenshot must show the
page the assertions saw. The PNGs are kept in $GIL_EXPORTER_ARTIFACTS (default: the system's
temporary directory) as gil-exporter-landing.png and gil-exporter-process.png.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import workloads
from harness import write_config
from workloads import start_workload

if TYPE_CHECKING:
    from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("GIL_EXPORTER_ARTIFACTS", tempfile.gettempdir()))
CONTENDED_ROW = (0xFD, 0xE0, 0xDC)  # tr.contended td background in exporter/http.py
BADGE_RED = (0xC6, 0x28, 0x28)
SPARK_BLUE = (0x15, 0x65, 0xC0)


def screenshot(html_text: str, out: Path, size=(1600, 1000)) -> Image.Image:
    from PIL import Image
    if CHROMIUM is None:
        pytest.fail("chromium is missing: run tests/setup/chromium.sh")
    with tempfile.TemporaryDirectory(prefix="gil-chromium-") as profile:
        page = Path(profile) / "page.html"
        page.write_text(html_text)
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update",
                            "--disable-sync", f"--user-data-dir={profile}/profile",
                            "--hide-scrollbars", f"--window-size={size[0]},{size[1]}",
                            f"--screenshot={out}", page.as_uri()],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and out.exists(), r.stderr[-2000:]
    return Image.open(out).convert("RGB")


def bands(img, color, min_pixels: int = 40, tol: int = 6) -> list[tuple[int, int]]:
    """Vertical extents (y0, y1) of the horizontal bands where `color` fills a row of pixels."""
    w, h = img.size
    px = img.load()
    rows = []
    for y in range(h):
        n = sum(1 for x in range(0, w, 2)
                if all(abs(a - b) <= tol for a, b in zip(px[x, y], color)))
        rows.append(n * 2 >= min_pixels)
    out, start = [], None
    for y, on in enumerate(rows + [False]):
        if on and start is None:
            start = y
        elif not on and start is not None:
            out.append((start, y))
            start = None
    return out


@pytest.fixture
def watched(exporter, tmp_path):
    cfg = write_config(tmp_path, """
targets:
  - name: shop
    match:
      cmdline: 'gil-workload .* landing-'
scan_interval_seconds: 1
window_seconds: 3
""")
    with start_workload("cpu", threads=3, argv_tag="landing-cpu") as hot, \
            start_workload("sleep", threads=2, argv_tag="landing-sleep") as calm:
        exp = exporter("--config", str(cfg))
        yield exp, hot, calm


def _rows(page: str) -> list[tuple[str, str]]:
    """(class, pid) of each process row, in page order."""
    return re.findall(r'<tr class="(\w+)" data-pid="(\d+)">', page)


def _settled(exp, hot, calm):
    """The landing page once the hot process is scored contended and the calm one scored."""
    def ready():
        hot_score = exp.value("pygil_gil_contention_score", pid=hot.pid)
        calm_score = exp.value("pygil_gil_contention_score", pid=calm.pid)
        if hot_score is None or calm_score is None or hot_score < 0.5:
            return None
        status, page = exp.get("/")
        rows = _rows(page)
        if status == 200 and ("contended", str(hot.pid)) in rows and ("ok", str(calm.pid)) in rows:
            return page
        return None
    return exp.wait_for(ready, timeout=40, interval=0.5)


def test_landing_page_marks_the_contended_process(watched):
    exp, hot, calm = watched
    page = _settled(exp, hot, calm)
    rows = _rows(page)
    # Sorted by score: the contended process first; exactly one row marked.
    assert rows[0] == ("contended", str(hot.pid)), rows
    assert [c for c, _ in rows].count("contended") == 1
    # Command lines tell the rows apart (every default target is "python"); verdicts are given.
    shown = dict(re.findall(r'data-pid="(\d+)">.*?<td class="l cmd" title="[^"]*">([^<]*)</td>', page))
    assert shown[str(hot.pid)].endswith("gil-workload cpu landing-cpu"), shown
    assert shown[str(calm.pid)].endswith("gil-workload sleep landing-sleep"), shown
    assert all(len(s) <= 90 for s in shown.values()), shown
    assert "CPU-bound Python threads serialized on the GIL" in page
    assert "1 contended" in page and "gil-exporter diagnose PID" in page
    assert f'href="/process/{hot.pid}"' in page and "python-gil-contention.md" in page
    assert "(gil_state)" in page  # the method stays visible next to each score

    img = screenshot(page, ARTIFACTS / "gil-exporter-landing.png")
    marked = bands(img, CONTENDED_ROW)
    # One contended row, marked across the table: one band about one table row high.
    assert len(marked) == 1, marked
    y0, y1 = marked[0]
    assert 12 <= y1 - y0 <= 120, marked
    badges = bands(img, BADGE_RED, min_pixels=20)
    assert any(y0 <= b0 and b1 <= y1 + 1 for b0, b1 in badges), (badges, marked)
    print(f"landing page screenshot: {ARTIFACTS / 'gil-exporter-landing.png'} "
          f"(contended row at y={y0}-{y1})")


def test_process_page_verdict_sparkline_and_links(watched):
    exp, hot, calm = watched
    _settled(exp, hot, calm)
    exp.wait_for(lambda: "<polyline" in exp.get(f"/process/{hot.pid}")[1], timeout=20)
    status, page = exp.get(f"/process/{hot.pid}")
    assert status == 200
    assert "CPU-bound Python threads serialized on the GIL" in page
    assert "ProcessPoolExecutor" in page  # the advice, as diagnose gives it
    assert f"gil-exporter diagnose {hot.pid}" in page
    assert "python-gil-contention.md" in page and 'href="/metrics"' in page
    assert re.search(r'<svg [^>]*role="img"[^>]*>.*<polyline points="[^"]+"', page, re.S)
    assert "<script" not in page  # no JavaScript needed
    # The per-thread table: every thread of the process, by TID
    m = re.search(r'<section id="threads">(.*?)</section>', page, re.S)
    assert m and "<table" in m.group(1)
    tids = {int(t) for t in re.findall(r'<tr data-tid="(\d+)">', m.group(1))}
    assert tids == {int(t) for t in os.listdir(f"/proc/{hot.pid}/task")}, m.group(1)
    img = screenshot(page, ARTIFACTS / "gil-exporter-process.png", size=(1200, 1100))
    assert bands(img, SPARK_BLUE, min_pixels=2, tol=40), "no sparkline drawn"
    assert bands(img, BADGE_RED, min_pixels=20)
    assert exp.get("/process/999999999")[0] == 404
    status, calm_page = exp.get(f"/process/{calm.pid}")
    assert status == 200 and "CONTENDED" not in calm_page


def _thread_table(page: str) -> list[tuple[int, str, str, str, str]]:
    """(tid, name, GIL held, waiting, CPU) of each row of the per-process page's thread table."""
    m = re.search(r'<section id="threads">(.*?)</section>', page, re.S)
    return [(int(tid), name, *cells) for tid, name, *cells in re.findall(
        r'<tr data-tid="(\d+)"><td>\d*</td><td class="l">([^<]*)</td><td>([^<]*)</td>'
        r'<td>([^<]*)</td><td>([^<]*)</td>', m.group(1) if m else "")]


def test_process_page_names_the_thread_holding_the_gil(exporter, tmp_path):
    """The per-thread table of /process/PID: the CPU-bound thread among sleepers first, with
    most of the GIL; the sleepers waiting for it. Looking at the page is what starts sampling."""
    cfg = write_config(tmp_path, """
targets:
  - name: app
    match:
      cmdline: 'gil-workload sleepers landing-threads'
scan_interval_seconds: 1
window_seconds: 5
""")
    with start_workload("sleepers", threads=3, argv_tag="landing-threads") as w:
        hot = workloads.thread_ids(w)["hot-worker"]
        exp = exporter("--config", str(cfg))
        exp.wait_for(lambda: exp.get(f"/process/{w.pid}")[0] == 200, timeout=30)
        time.sleep(3)                       # the table covers the time since the first look
        status, page = exp.get(f"/process/{w.pid}")
        rows = _thread_table(page)
        assert status == 200 and rows, page
        assert rows[0][0] == hot, rows
        assert float(rows[0][2].rstrip("%")) >= 50, rows
        assert {r[0] for r in rows} == {int(t) for t in os.listdir(f"/proc/{w.pid}/task")}
        assert sum(float(r[3].rstrip("%")) for r in rows[1:]) > 0, rows       # sleepers wait
        assert "futex()" in page and "<table" in page


def test_process_page_marks_the_holder_blocked(exporter, tmp_path):
    """A thread holding the GIL inside a blocking C call (ctypes.PyDLL usleep): the landing page
    and /process/PID give the verdict of its own, and the thread table marks the holder."""
    cfg = write_config(tmp_path, """
targets:
  - name: app
    match:
      cmdline: 'gil-workload frozen'
scan_interval_seconds: 1
window_seconds: 3
""")
    with start_workload("frozen", threads=3) as w:
        holder = int(w.proc.stdout.readline().strip().split("=")[1])
        exp = exporter("--config", str(cfg))
        exp.wait_for(lambda: "GIL held while its holder was off the CPU" in exp.get("/")[1], timeout=40)
        exp.wait_for(lambda: exp.get(f"/process/{w.pid}")[0] == 200, timeout=30)
        time.sleep(3)                       # the table covers the time since the first look
        page = exp.wait_for(lambda: (p := exp.get(f"/process/{w.pid}")[1])
                            and "(held the GIL while blocked)" in p and p, timeout=20)
        rows = {r[0]: r for r in _thread_table(page)}
        assert "(held the GIL while blocked)" in rows[holder][1], rows
        assert sum("blocked" in r[1] for r in rows.values()) == 1, rows
        assert "GIL held while its holder was off the CPU" in page
        assert f"thread {holder} " in page, page    # the page's own table names the holder
        assert "ctypes.CDLL" in page
