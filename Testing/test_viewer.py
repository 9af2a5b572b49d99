"""``deeplungreg view``: what it loads (no browser needed), its clear refusals, and the page itself: the server
started on a free local port on a real small registration, driven by headless Chromium through its DevTools
protocol on 127.0.0.1, checked in the screenshot's pixels.

The browser test skips, saying why, where Chromium, EGL or the viewer packages are missing
(``scripts/run_tests.sh`` installs them where it can).
"""

from __future__ import annotations

import asyncio
import base64
import ctypes.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from DeepLungRegLib.cli import main
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.io import write_lps_landmarks
from DeepLungRegLib.simulation import BreathingParams, simulate_pair
from DeepLungRegLib.transforms import transform_points
from DeepLungRegLib.viewer_data import (
    JACOBIAN_FIRST_BIN,
    JACOBIAN_FOLDING,
    JACOBIAN_OUTSIDE,
    TRE_BIN_COLORS,
    jacobian_colors,
    jacobian_labels,
    label_det,
    load,
    resolve_output,
)

VIEWPORT = (1400, 900)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registration(small_ct, tiny_model, tmp_path_factory):
    """A real small registration output (the bundled CT at 4 mm, a breathing-like copy, 40 landmark pairs,
    the tiny untrained model) and its landmark files."""
    d = tmp_path_factory.mktemp("view")
    sim = simulate_pair(small_ct, BreathingParams(n_landmarks=40, lattice_mm=4.0))
    sitk.WriteImage(sim.fixed, str(d / "fixed.nii.gz"))
    sitk.WriteImage(sim.moving, str(d / "moving.nii.gz"))
    write_lps_landmarks(d / "fixed_lm.txt", sim.fixed_landmarks)
    write_lps_landmarks(d / "moving_lm.txt", sim.moving_landmarks)
    out = d / "out"
    rc = main([str(a) for a in ("register", d / "fixed.nii.gz", d / "moving.nii.gz", "-o", out, "--model",
                                tiny_model, "--fixed-landmarks", d / "fixed_lm.txt", "--moving-landmarks",
                                d / "moving_lm.txt", "--refine", "off", "--no-qa", "--quiet")])
    assert rc == 0
    return {"out": out, "fixed_lm": d / "fixed_lm.txt", "moving_lm": d / "moving_lm.txt", "dir": d}


# --------------------------------------------------------------------------- data (no browser)
def test_jacobian_labels_and_colours():
    det = np.array([-0.5, 0.0, 0.5, 1.0, 2.0, 1e6, np.nan, 1.0])
    inside = np.array([True, True, True, True, True, True, True, False])
    lab = jacobian_labels(det, inside)
    assert lab[0] == lab[1] == JACOBIAN_FOLDING
    assert lab[6] == lab[7] == JACOBIAN_OUTSIDE
    np.testing.assert_allclose(label_det(lab[2:5]), [0.5, 1.0, 2.0], rtol=3e-3)
    rgba = jacobian_colors(0.5, 2.0)
    assert rgba[JACOBIAN_OUTSIDE, 3] == 0.0 and tuple(rgba[JACOBIAN_FOLDING]) == (0.0, 1.0, 0.0, 1.0)
    one = rgba[lab[3]]
    assert one[3] < 0.01 and one[:3].min() > 0.99          # det 1: white and transparent
    np.testing.assert_allclose(rgba[lab[2]], [0, 0, 1, 1], atol=5e-3)   # low end: opaque blue
    np.testing.assert_allclose(rgba[lab[4]], [1, 0, 0, 1], atol=5e-3)   # high end: opaque red
    assert tuple(rgba[lab[5]]) == (1.0, 0.0, 0.0, 1.0)     # saturated beyond the range
    # symmetric on a log scale around 1
    a, b = rgba[jacobian_labels(np.array([0.8]), np.array([True]))[0]], rgba[
        jacobian_labels(np.array([1.25]), np.array([True]))[0]]
    assert abs(a[3] - b[3]) < 0.01
    with pytest.raises(ValueError):
        jacobian_colors(1.2, 2.0)
    assert JACOBIAN_FIRST_BIN > JACOBIAN_FOLDING


def test_load_reads_what_register_wrote(registration):
    r = registration
    data = load(r["out"], fixed_landmarks=str(r["fixed_lm"]), moving_landmarks=str(r["moving_lm"]))
    report = json.loads((r["out"] / "report.json").read_text())
    fixed = sitk.ReadImage(report["fixed"])
    assert data.fixed.GetSize() == data.warped.GetSize() == data.difference.GetSize() == fixed.GetSize()
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(r["out"] / "warped.nii.gz"))).astype(np.float64)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(data.difference),  # HU, rounded
                                  np.rint(sitk.GetArrayFromImage(fixed).astype(np.float64) - warped))
    # the TRE of every landmark, from the written transform, agrees with the report
    tx = sitk.ReadTransform(str(r["out"] / "transform.h5"))
    f, m = np.loadtxt(r["fixed_lm"]), np.loadtxt(r["moving_lm"])
    np.testing.assert_allclose(data.landmarks.tre_after, np.linalg.norm(transform_points(tx, f) - m, axis=1))
    assert data.landmarks.tre_after.mean() == pytest.approx(report["tre_mm"]["after"]["mean"], rel=1e-9)
    assert not data.notes
    # the overlay is the written Jacobian, in the lung only
    lab = sitk.GetArrayFromImage(data.jacobian)
    det = sitk.GetArrayFromImage(sitk.ReadImage(str(r["out"] / "jacobian.nii.gz")))
    inside = (lab != JACOBIAN_OUTSIDE)
    assert 0.02 < inside.mean() < 0.8
    bins = lab >= JACOBIAN_FIRST_BIN
    np.testing.assert_allclose(label_det(lab[bins]), det[bins], rtol=3e-3)
    assert data.jacobian_lung_range[0] <= det[inside].min() + 1e-6


def test_without_warped_image_the_moving_image_is_resampled_through_the_transform(registration, tmp_path):
    out = tmp_path / "no_warped"
    shutil.copytree(registration["out"], out)
    (out / "warped.nii.gz").unlink()  # as 'register --no-warped' leaves it
    data = load(out)
    assert any("--no-warped" in n for n in data.notes)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(registration["out"] / "warped.nii.gz"))).astype(float)
    np.testing.assert_allclose(sitk.GetArrayFromImage(data.warped), written, atol=1.0)  # int16 rounding


def test_landmarks_come_from_the_report_else_the_viewer_says_how_to_show_them(registration, tmp_path):
    report = json.loads((registration["out"] / "report.json").read_text())
    assert report["landmark_files"]["fixed"] == str(registration["fixed_lm"].resolve())
    data = load(registration["out"])          # register recorded its landmark files: found without options
    assert data.landmarks is not None and len(data.landmarks.tre_after) == 40
    out = tmp_path / "no_landmarks"
    shutil.copytree(registration["out"], out)
    report.pop("landmark_files")
    (out / "report.json").write_text(json.dumps(report))
    data = load(out)
    assert data.landmarks is None
    assert any("--fixed-landmarks" in n for n in data.notes)


def test_outputs_it_refuses(registration, tmp_path):
    out = registration["out"]
    with pytest.raises(InputError, match="no such folder"):
        resolve_output(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        resolve_output(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="not a registration output.*report.json"):
        resolve_output(empty)
    summary = tmp_path / "evaluate"
    summary.mkdir()
    (summary / "results.csv").write_text("case,method\n")
    with pytest.raises(InputError, match="'evaluate' summary.*register-batch"):
        resolve_output(summary, case="case1")
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copytree(out, batch / "case1")
    with pytest.raises(InputError, match="choose one with --case NAME.*case1"):
        resolve_output(batch)
    with pytest.raises(InputError, match="no case 'case2'; cases: case1"):
        resolve_output(batch, case="case2")
    assert resolve_output(batch, case="case1") == batch / "case1"
    with pytest.raises(InputError, match="leave out --case"):
        resolve_output(out, case="x")


def test_view_errors_are_one_line(registration, tmp_path, capsys, monkeypatch):
    def run(*args):
        rc = main(["view", *map(str, args)])
        err = capsys.readouterr().err.strip().splitlines()
        return rc, err

    rc, err = run(tmp_path)
    assert rc == 2 and len(err) == 1 and "not a registration output" in err[0]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        rc, err = run(registration["out"], "--port", busy.getsockname()[1])
    assert rc == 2 and len(err) == 1 and "already in use" in err[0], err
    monkeypatch.setitem(sys.modules, "trame_slicer", None)  # as if the viewer packages were not installed
    rc, err = run(registration["out"], "--port", free_port())
    assert rc == 2 and len(err) == 1 and "needs the viewer packages" in err[0] and "pip install" in err[0], err


def test_the_library_imports_without_the_viewer_packages():
    code = ("import sys, DeepLungRegLib.cli, DeepLungRegLib.viewer_data, DeepLungRegLib.pipeline;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('trame', 'trame_slicer', 'slicer', 'vtk')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- the page, in Chromium
def _chromium() -> str | None:
    for name in (os.environ.get("DEEPLUNGREG_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _browser_test_skip_reason() -> str | None:
    try:
        from DeepLungRegLib.viewer import check_dependencies

        check_dependencies()
        import aiohttp  # noqa: F401  (the DevTools client; installed with trame)
        from PIL import Image  # noqa: F401
    except (InputError, ImportError) as exc:
        return f"viewer packages missing: {exc}"
    if _chromium() is None:
        return "Chromium not found (apt-get install chromium, or set DEEPLUNGREG_CHROMIUM)"
    if not os.environ.get("DISPLAY") and ctypes.util.find_library("EGL") is None:
        return "no display and no EGL library for headless rendering (apt-get install libegl1 libegl-mesa0 " \
               "libgl1-mesa-dri)"
    return None


class DevTools:
    """The little of the Chrome DevTools protocol the test needs, over aiohttp's websocket client."""

    def __init__(self, ws):
        self.ws, self.n, self.events = ws, 0, []

    async def call(self, method: str, **params):
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def js(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    async def until(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    async def screenshot(self) -> np.ndarray:
        from PIL import Image

        shot = await self.call("Page.captureScreenshot", format="png")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")).astype(np.int16)


VIEW_IDS = [f"{c}_{o}" for o in ("axial", "coronal", "sagittal") for c in ("fixed", "warped", "difference")]
FRAMES = "JSON.stringify(Object.fromEntries(%s.map(v => [v, document.querySelector('#view_' + v + ' img')?.src])))"


async def _frames(dt: DevTools, ids: list[str]) -> dict:
    return json.loads(await dt.js(FRAMES % json.dumps(ids)))


async def _new_frames(dt: DevTools, before: dict, timeout: float = 20.0, quiet: float = 0.8) -> None:
    """Wait until every view of ``before`` shows a newer frame, then until no view's frame changes for
    ``quiet`` seconds (views whose markers or overlay changed along with them render too)."""
    ids = list(before)
    await dt.until(f"(() => {{ const b = {json.dumps(before)}; const now = {FRAMES % json.dumps(ids)};"
                   f"return Object.entries(JSON.parse(now)).every(([k, v]) => v && v !== b[k]); }})()",
                   timeout, f"new frames in {ids}")
    last, since, deadline = await _frames(dt, VIEW_IDS), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = await _frames(dt, VIEW_IDS)
        if now != last:
            last, since = now, time.monotonic()


def _lung_coverage(coloured: np.ndarray, grey: np.ndarray) -> tuple[float, float, float]:
    """From a view with the overlay (its coloured pixels) and the same view without it (grey): the share of
    the lung that is coloured, and the shares of the coloured pixels outside the body and farther than
    10 pixels from the lung (body wall, mediastinum; the hilar vessels lie inside the lung mask).
    Lung: dark regions (< -530 HU in the QA window) not touching the view's border; outside: those touching it."""
    from scipy import ndimage

    dark = grey < 100
    labels, _ = ndimage.label(dark)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    lung = dark & ~outside
    n = max(int(coloured.sum()), 1)
    return (float(coloured[lung].mean()) if lung.any() else 0.0,
            float((coloured & ndimage.binary_erosion(outside, iterations=3)).sum() / n),
            float((coloured & ~ndimage.binary_dilation(lung, iterations=10)).sum() / n))


def _coloured(px: np.ndarray) -> np.ndarray:
    """Pixels of a clearly saturated colour (overlay or marker), not grey."""
    return (px.max(axis=-1) - px.min(axis=-1)) > 60


async def _drive_page(url: str, chromium: str, profile: Path, shots: Path, landmarks_ras: np.ndarray,
                      bins: np.ndarray, tre: np.ndarray) -> dict:
    """Everything the test measures on the page (the assertions are in the test)."""
    import aiohttp

    port = free_port()
    browser = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
         "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-default-apps", "--disable-extensions", "--mute-audio",
         f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # its own process group
    found: dict = {}
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            targets = None
            while targets is None:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                        targets = [t for t in await r.json() if t["type"] == "page"]
                except aiohttp.ClientError:
                    if time.monotonic() > deadline or browser.poll() is not None:
                        raise AssertionError("Chromium's DevTools endpoint did not come up") from None
                    await asyncio.sleep(0.1)
            async with http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                dt = DevTools(ws)
                await dt.call("Network.enable")
                await dt.call("Page.enable")
                await dt.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                              deviceScaleFactor=1, mobile=False)
                await dt.call("Page.navigate", url=url)
                # every view has a frame, rendered at the size of its place on the page
                await dt.until(f"{json.dumps(VIEW_IDS)}.every(v => {{ const d = document.getElementById('view_' + v);"
                               "const i = d && d.querySelector('img'); return i && i.complete && i.naturalWidth > 0 && "
                               "Math.abs(i.naturalWidth - d.clientWidth) <= 2 && "
                               "Math.abs(i.naturalHeight - d.clientHeight) <= 2; })", 30, "a frame in every view")
                await asyncio.sleep(1.0)
                rects = json.loads(await dt.js(
                    f"JSON.stringify(Object.fromEntries({json.dumps(VIEW_IDS)}.map(v => [v, "
                    "(r => [r.x, r.y, r.width, r.height])(document.getElementById('view_' + v).getBoundingClientRect())"
                    "])))"))
                found["rects"] = rects

                def crop(img, vid, margin=18):
                    x, y, w, h = (int(round(v)) for v in rects[vid])
                    return img[y + margin:y + h - 2, x + 2:x + w - 2]

                # 1. overlay on the fixed column, landmarks hidden, a narrow range: saturated colours (the tiny model's
                # det is about constant, 0.955, in the lung)
                before = await _frames(dt, VIEW_IDS[:1])
                await dt.js("window.trame.state.update({lm_show: false, jac_range: [0.99, 1.01], jac_opacity: 1})")
                await _new_frames(dt, before)
                on_fixed = await dt.screenshot()
                # 2. overlay moved to the warped column: the fixed views become plain CT
                before = await _frames(dt, [v for v in VIEW_IDS if not v.startswith("difference")])
                await dt.js("window.trame.state.update({jac_column: 'warped'})")
                await _new_frames(dt, before)
                on_warped = await dt.screenshot()
                found["overlay"] = {vid: (float(_coloured(crop(on_fixed, vid)).mean()),
                                          float(_coloured(crop(on_warped, vid)).mean())) for vid in VIEW_IDS}
                # the overlay covers the lung (dark inside the body) and nothing outside the body
                found["overlay_lung"] = {}
                for o in ("axial", "coronal", "sagittal"):
                    col = _coloured(crop(on_fixed, f"fixed_{o}"))
                    grey = crop(on_warped, f"fixed_{o}").mean(axis=-1)
                    found["overlay_lung"][o] = _lung_coverage(col, grey)
                for vid in VIEW_IDS:
                    c = crop(on_warped, vid).mean(axis=-1)
                    found.setdefault("contrast", {})[vid] = (float(c.std()), float(np.percentile(c, 99) -
                                                                                  np.percentile(c, 1)))
                # 3. the landmark with the largest TRE, from the table: every view centred on its marker
                worst = int(np.argmax(tre))
                before = await _frames(dt, [v for v in VIEW_IDS if v.startswith("warped")])
                await dt.js("window.trame.state.update({lm_show: true, jac_show: false})")
                await _new_frames(dt, before)
                before = await _frames(dt, VIEW_IDS)
                await dt.js(f"document.querySelector('#lm_row_{worst}').click()")
                await _new_frames(dt, before)
                offsets = json.loads(await dt.js("JSON.stringify(window.trame.state.get('slice_positions'))"))
                found["jump_offsets"] = offsets
                found["jump_expected"] = {"axial": landmarks_ras[worst][2], "coronal": landmarks_ras[worst][1],
                                          "sagittal": landmarks_ras[worst][0]}  # RAS mm of the landmark
                marked = await dt.screenshot()
                colour = np.array(TRE_BIN_COLORS[bins[worst]]) * 255
                found["marker"] = {}
                for vid in VIEW_IDS:
                    x, y, w, h = rects[vid]
                    cx, cy = int(round(x + w / 2)), int(round(y + h / 2))
                    patch = marked[cy - 8:cy + 9, cx - 8:cx + 9]
                    found["marker"][vid] = int((np.linalg.norm(patch - colour, axis=-1) < 70).sum())
                # 4. a wheel event in one view moves the linked slice in the others of its row, only those
                before_offsets = offsets
                before = await _frames(dt, VIEW_IDS)
                x, y, w, h = rects["warped_coronal"]
                await dt.call("Input.dispatchMouseEvent", type="mouseMoved", x=x + w / 2, y=y + h / 2)
                await dt.call("Input.dispatchMouseEvent", type="mouseWheel", x=x + w / 2, y=y + h / 2, deltaX=0,
                              deltaY=-120)
                coronal = [v for v in VIEW_IDS if v.endswith("coronal")]
                await dt.until("(() => { const o = window.trame.state.get('slice_positions'); const b = "
                               f"{json.dumps(before_offsets)}; return {json.dumps(coronal)}.every(v => "
                               "Math.abs(o[v] - b[v]) > 1e-3); })()", 15, "the coronal slices to move")
                await _new_frames(dt, {v: before[v] for v in coronal})
                wheeled = await dt.screenshot()
                found["wheel_offsets"] = json.loads(await dt.js(
                    "JSON.stringify(window.trame.state.get('slice_positions'))"))
                found["wheel_before"] = before_offsets
                found["wheel_change"] = {vid: float(np.abs(crop(wheeled, vid) - crop(marked, vid)).mean())
                                         for vid in VIEW_IDS}
                for name, img in (("overlay_fixed", on_fixed), ("overlay_warped", on_warped), ("landmark", marked),
                                  ("wheel", wheeled)):
                    from PIL import Image

                    Image.fromarray(img.astype(np.uint8)).save(shots / f"{name}.png")
                found["requests"] = sorted({e["params"]["request"]["url"] for e in dt.events
                                            if e.get("method") == "Network.requestWillBeSent"})
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:  # helper processes Chromium started and left behind, by the group of the process started here
            os.killpg(browser.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        browser.wait(5)
    return found


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_page_in_headless_chromium(registration, tmp_path):
    reason = _browser_test_skip_reason()
    if reason:
        pytest.skip(reason)
    r = registration
    data = load(r["out"], fixed_landmarks=str(r["fixed_lm"]), moving_landmarks=str(r["moving_lm"]))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-m", "DeepLungRegLib.cli", "view", str(r["out"]), "--port", str(port),
         "--fixed-landmarks", str(r["fixed_lm"]), "--moving-landmarks", str(r["moving_lm"])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    try:
        while True:  # the server says where it listens once it is ready
            line = server.stdout.readline()
            if not line:
                raise AssertionError("the viewer exited before serving:\n" + "".join(log))
            log.append(line)
            if "Ctrl+C to stop" in line:
                break
            if time.monotonic() - t0 > 90:
                raise AssertionError("the viewer did not start in 90 s:\n" + "".join(log))
        assert f"http://127.0.0.1:{port}/" in line
        shots = tmp_path / "shots"
        shots.mkdir()
        ras = data.landmarks.fixed * np.array([-1.0, -1.0, 1.0])
        found = asyncio.run(_drive_page(f"http://127.0.0.1:{port}/", _chromium(), tmp_path / "profile", shots, ras,
                                        data.landmarks.bins(), data.landmarks.tre_after))
    finally:
        _stop(server)
    assert server.returncode is not None
    where = f"(screenshots and measurements in {shots})"
    (shots / "found.json").write_text(json.dumps(found, indent=1, default=float))
    # contrast in every view
    for vid, (std, spread) in found["contrast"].items():
        assert std > 15 and spread > 60, (vid, std, spread, where)
    # overlay colours only where the Jacobian is shown, and there inside the lung
    for vid, (when_fixed, when_warped) in found["overlay"].items():
        column = vid.split("_")[0]
        assert (when_fixed > 0.01) == (column == "fixed"), (vid, when_fixed, where)
        assert (when_warped > 0.01) == (column == "warped"), (vid, when_warped, where)
        if column == "difference":
            assert when_fixed < 1e-3 and when_warped < 1e-3, (vid, when_fixed, when_warped, where)
    for o, (covered, outside, far) in found["overlay_lung"].items():
        assert covered > 0.9 and outside < 0.002 and far < 0.01, (o, covered, outside, far, where)
    # the table jumps every view to the landmark, and its marker is where it projects: the centre of each view
    for vid, offset in found["jump_offsets"].items():
        assert offset == pytest.approx(found["jump_expected"][vid.split("_")[1]], abs=0.01), (vid, found)
    for vid, at_centre in found["marker"].items():  # pixels of the marker's colour within 8 px of the centre
        assert at_centre >= 20, (vid, found["marker"], where)
    # the wheel in one coronal view moved all coronal views, by the same step, and no other view
    before, after = found["wheel_before"], found["wheel_offsets"]
    steps = {vid: after[vid] - before[vid] for vid in VIEW_IDS}
    coronal = [steps[v] for v in VIEW_IDS if v.endswith("coronal")]
    assert abs(coronal[0]) > 0.5 and max(coronal) - min(coronal) < 1e-3, steps
    assert all(abs(steps[v]) < 1e-6 for v in VIEW_IDS if not v.endswith("coronal")), steps
    for vid, change in found["wheel_change"].items():
        assert (change > 0.5) == vid.endswith("coronal"), (vid, found["wheel_change"], where)
    # nothing was loaded from anywhere but the server
    outside = [u for u in found["requests"] if not u.startswith((f"http://127.0.0.1:{port}/", "blob:", "data:"))]
    assert not outside, outside
    assert time.monotonic() - t0 < 60, f"took {time.monotonic() - t0:.0f} s"


def test_a_fixed_image_of_another_run_is_refused(registration, tmp_path, small_ct):
    """report.json names its inputs; if the path leads to a different image (another run's file of the same
    name), the viewer refuses instead of showing it under this run's warped image and Jacobian."""
    out = tmp_path / "other"
    shutil.copytree(registration["out"], out)
    report = json.loads((out / "report.json").read_text())
    assert Path(report["fixed"]).is_absolute()          # register records resolved paths
    other = tmp_path / "fixed.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(small_ct, [40, 40, 30], [2, 2, 2]), str(other))
    report["fixed"] = str(other)
    (out / "report.json").write_text(json.dumps(report))
    with pytest.raises(InputError, match="is not the one registered"):
        load(out)


def test_recorded_landmark_format_is_used(registration, monkeypatch, tmp_path):
    import DeepLungRegLib.viewer_data as vd

    seen = []
    real = vd.load_landmarks

    def spy(folder, report, fixed, moving_path, f_lm, m_lm, fmt, *rest):
        seen.append(fmt)
        return real(folder, report, fixed, moving_path, f_lm, m_lm, fmt, *rest)

    monkeypatch.setattr(vd, "load_landmarks", spy)
    out = tmp_path / "fmt"
    shutil.copytree(registration["out"], out)
    report = json.loads((out / "report.json").read_text())
    assert report["landmark_files"]["format"] == "auto"
    report["landmark_files"]["format"] = "lps"       # as 'register --landmark-format lps' records it
    (out / "report.json").write_text(json.dumps(report))
    load(out)                                          # the run's format, not the viewer's default
    load(out, landmark_format="auto")                  # "auto" is the default: the recorded one still wins
    load(registration["out"])                          # recorded "auto"
    assert seen == ["lps", "lps", "auto"]
