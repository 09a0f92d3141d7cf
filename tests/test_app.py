"""The Gradio demo, driven two ways: gradio_client against the API, and a real headless Chromium via Playwright."""

import json
import shutil
import socket

import pytest

from diffroute.app.app import build_demo
from diffroute.app.service import DemoService
from diffroute.schedule import Schedule

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
    with pytest.raises(AppError, match="Unknown plan"):
        client.predict("cat", 6, 4.5, 0, 1, "warp-speed", None, api_name="/generate")
    d = Schedule.fora(service.arch, 6, 2).to_dict()
    d["num_blocks"], d["compute"] = 2, [" ".join(r.split()[:2]) for r in d["compute"]]
    bad = tmp_path / "other_model.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(AppError, match="has 2 blocks, the model has 6"):
        client.predict("cat", 6, 4.5, 0, 1, "full", handle_file(str(bad)), api_name="/generate")


def test_service_limits():
    service = DemoService.__new__(DemoService)  # validation needs no model
    with pytest.raises(ValueError, match="between 1 and 100"):
        service.validate("cat", 101, 1)
    with pytest.raises(ValueError, match="between 1 and 8"):
        service.validate("cat", 10, 9)
    with pytest.raises(ValueError, match="limit is 200"):
        service.validate("x" * 201, 10, 1)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it with apt)")
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
