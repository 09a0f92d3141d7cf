"""The Gradio demo, driven two ways: gradio_client against the API, and a real headless Chromium via Playwright."""

import json
import os
import shutil
import socket

import pytest

from diffroute.app.app import build_demo
from diffroute.app.service import DemoService
from diffroute.core.schedule import Schedule

# `make test BROWSER=0` asks for no browser: the test is skipped even where one is installed
CHROMIUM = (
    None if os.environ.get("DIFFROUTE_BROWSER") == "0" else shutil.which("chromium") or shutil.which("chromium-browser")
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    service = DemoService("tiny-pixart", device="cpu")
    demo = build_demo("tiny-pixart", service=service)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", service
    demo.close()


def test_generate_through_the_api(server):
    from gradio_client import Client

    url, _ = server
    client = Client(url, verbose=False)
    slider, full, fast, summary, heatmap = client.predict(
        "a red apple", 6, 4.5, 3, 2, "fora-2", None, api_name="/generate"
    )
    assert "Speedup" in summary and "computed 50%" in summary  # steps 0, 2, 4 of 6 compute
    assert len(full) == len(fast) == 2 and len(slider) == 2
    assert heatmap is not None


def test_invalid_inputs_return_clear_errors(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, service = server
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="Type a prompt first"):
        client.predict("", 6, 4.5, 0, 1, "fora-2", None, api_name="/generate")
    with pytest.raises(AppError):  # not one of the offered plans
        client.predict("cat", 6, 4.5, 0, 1, "warp-speed", None, api_name="/generate")
    d = Schedule.fora(service.arch, 6, 2).to_dict()
    d["num_blocks"], d["compute"] = 2, [" ".join(r.split()[:2]) for r in d["compute"]]
    bad = tmp_path / "other_model.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(AppError, match="has 2 blocks, the model has 6"):
        client.predict("cat", 6, 4.5, 0, 1, "full", handle_file(str(bad)), api_name="/generate")


def test_service_limits():
    service = DemoService.__new__(DemoService)  # validation needs no model
    with pytest.raises(ValueError, match="from 1 to 100"):
        service.validate("cat", 101, 1)
    with pytest.raises(ValueError, match="from 1 to 8"):
        service.validate("cat", 10, 9)
    with pytest.raises(ValueError, match="limit is 200"):
        service.validate("x" * 201, 10, 1)
    for guidance in (float("nan"), -1.0):  # the CLI's rule: finite and >= 0
        with pytest.raises(ValueError, match="Guidance"):
            service.validate("cat", 10, 1, guidance)
    with pytest.raises(ValueError, match="Seed"):
        service.validate("cat", 10, 1, 4.5, 2**64)
    with pytest.raises(ValueError, match="Steps must be a whole number"):
        service.validate("cat", 2.5, 1)


def test_one_step_in_the_app(server):
    from gradio_client import Client

    url, _ = server
    *_, summary, _ = Client(url, verbose=False).predict("cat", 1, 4.5, 0, 1, "fora-2", None, api_name="/generate")
    assert "computed 100%" in summary  # one step: nothing to reuse


def _raw_call(url: str, data: list) -> str:
    """POST to the generate endpoint over plain HTTP, as a hostile client would (gradio_client would upload a local
    file itself); returns the event stream's text."""
    import httpx

    event = httpx.post(f"{url}gradio_api/call/generate", json={"data": data}, timeout=60).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/generate/{event}", timeout=120).text


def test_the_app_opens_no_path_a_client_names(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, service = server
    client = Client(url, verbose=False)
    secret = tmp_path / "secret.json"  # a readable JSON schedule on the server, outside the upload folder
    Schedule.fora(service.arch, 6, 2).save(secret)
    opened = []
    real_load = Schedule.load
    Schedule.load = classmethod(lambda cls, path: opened.append(path) or real_load(path))
    try:
        for plan in (str(secret), f"teacache-0.3@{secret}", "/etc/passwd", "../../etc/passwd"):
            with pytest.raises(AppError) as err:
                client.predict("cat", 2, 4.5, 0, 1, plan, None, api_name="/generate")
            assert "root:x:0" not in str(err.value) and "not in the list of choices" in str(err.value)
        answers = set()  # a file reference naming a server path instead of an upload
        for path in (str(secret), "/etc/passwd", str(tmp_path / "does-not-exist.json")):
            ref = {"path": path, "meta": {"_type": "gradio.FileData"}}
            text = _raw_call(url, ["cat", 2, 4.5, 0, 1, "full", ref])
            assert "event: error" in text and "root:x:0" not in text
            answers.add(text.replace(path, "PATH"))
        assert len(answers) == 1  # the same answer whether or not the path exists
        with pytest.raises(ValueError) as err:  # and the service itself opens nothing outside Gradio's uploads
            service.resolve("full", str(secret))
        assert str(err.value) == str(pytest.raises(ValueError, service.resolve, "full", "/no/such.json").value)
        big = tmp_path / "big.json"
        big.write_text(" " * (2**20 + 10))
        with pytest.raises(AppError):
            client.predict("cat", 2, 4.5, 0, 1, "full", handle_file(str(big)), api_name="/generate")
    finally:
        Schedule.load = real_load
    assert not any(str(secret) == str(p) for p in opened)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no browser: Debian's chromium is not installed (make test installs it with apt) or BROWSER=0",
)
def test_real_browser(server, tmp_path):
    pytest.importorskip("playwright", reason="playwright (Python) is not installed")
    from playwright.sync_api import sync_playwright

    url, _ = server
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(url)
        page.locator("#prompt textarea").fill("grinning face")
        page.locator("#generate").click()
        page.locator("#speedup").get_by_text("Speedup").wait_for(timeout=120_000)
        page.locator("#slider img").nth(1).wait_for(timeout=30_000)
        assert page.locator("#slider img").count() >= 2
        assert "computed" in page.locator("#speedup").inner_text()
        page.locator("#heatmap img").first.wait_for(timeout=30_000)
        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000


def test_compute_map_shows_forecast_cells_in_their_own_colour():
    import numpy as np

    import diffroute
    from diffroute.app.heatmap import COLOURS, compute_map_image
    from tests.conftest import fresh_pipe, prompts, run

    pipe = fresh_pipe()
    diffroute.apply(pipe, "taylor-3")
    run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1], steps=9)
    stats = pipe.last_stats
    forecast, computed = stats.forecast_tensor(), stats.compute_tensor()
    # taylor-3 at 9 steps: steps 0, 3, 6 compute; the steps after the second computed one forecast (two outputs
    # stored by then), steps 1-2 reuse (one output only)
    assert forecast[4:6].nan_to_num(0).eq(1).any() and forecast[1:3].nan_to_num(0).eq(0).all()
    assert bool(((computed.nan_to_num(0) + forecast.nan_to_num(0)) <= 1).all())
    pixels = np.asarray(compute_map_image(stats)).reshape(-1, 3).astype(int)
    orange = np.array([round(255 * v) for v in COLOURS["forecast"]])
    assert (np.abs(pixels - orange).sum(axis=1) <= 6).sum() > 50  # forecast cells drawn (and in the legend)


def test_uploads_are_rate_limited_per_client(tmp_path):
    import httpx

    from diffroute.app.uploads import guarded_app_kwargs

    service = DemoService("tiny-pixart", device="cpu")
    demo = build_demo("tiny-pixart", service=service)
    port = _free_port()
    kwargs = guarded_app_kwargs(per_minute=2)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, app_kwargs=kwargs)
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        codes = [
            httpx.post(url, files={"files": ("s.json", b"{}", "application/json")}, timeout=30).status_code
            for _ in range(3)
        ]
        assert codes == [200, 200, 429]  # the client's third upload within a minute
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).status_code == 200  # other requests pass
    finally:
        demo.close()


def test_uploads_are_capped_in_total(tmp_path):
    from diffroute.app.uploads import UploadGuard

    guard = UploadGuard(None, folder=str(tmp_path), per_minute=100, max_total=10_000)
    assert guard._refusal("a") is None
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "big.json").write_bytes(b" " * 10_000)  # what earlier uploads left
    assert guard._refusal("b")[0] == 507 and guard._refusal("a")[0] == 507
    (tmp_path / "x" / "big.json").unlink()  # deleted (hourly, or at shutdown): uploads are taken again
    assert guard._refusal("b") is None


def test_sigterm_deletes_the_uploads(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import httpx

    port = _free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    cmd = [sys.executable, "-m", "diffroute", "app", "--model", "tiny-pixart", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        up = httpx.post(
            f"http://127.0.0.1:{port}/gradio_api/upload", files={"files": ("s.json", b"{}", "application/json")}
        )
        assert up.status_code == 200 and any(p.is_file() for p in (tmp_path / "gradio").rglob("s.json"))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not any(p.is_file() for p in (tmp_path / "gradio").rglob("s.json"))
