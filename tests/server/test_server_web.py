"""The web page at / in a real browser: Debian's chromium, headless, driven by selenium, against `llamasplit serve`
on loopback with an API key and two models planned over two local RPC devices.

The page asks for the key, draws each device's bars with the plan's bytes, streams a chat, and its Stop button
frees the sequence on the server. Screenshots (desktop and phone widths) go to tests/artifacts/web/. Without
chromium and chromedriver (`make test` installs them where apt-get can) the browser tests skip and say why.
The server runs in its own process, as in test_server_rpc.py: llama.cpp's RPC client state is process-wide.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.kit.rpcbed import rpc_servers
from tests.server.support import metric_value, serve_cli, wait_for

pytestmark = pytest.mark.llama
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / "web"
KEY = "web-test-key"
MODELS = ("smol", "smol-b")  # the same GGUF twice: two models that share both devices
WAIT_S = 30.0
DESKTOP = "--window-size=1280,1000"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@dataclass
class WebServer:
    url: str
    http: httpx.Client

    def plan(self) -> dict[str, Any]:
        return {entry["model"]: entry for entry in self.http.get("/v1/plan").json()["data"]}

    def metric(self, name: str, model: str) -> float:
        value = metric_value(self.http.get("/metrics").text, name, model=model)
        assert value is not None, name
        return value


@pytest.fixture(scope="module")
def web_server(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    log = tmp_path_factory.mktemp("web") / "serve.log"
    models = [arg for alias in MODELS for arg in ("--model", f"{alias}={smollm2}")]
    with rpc_servers(2) as endpoints:
        args = [*models, "--rpc", ",".join(endpoints), "--ctx", "2048", "--parallel", "2", "--n-gpu-layers", "31",
                "--tensor-split", "0.6,0.4", "--api-key", KEY]  # fmt: skip
        with serve_cli(args, log) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        ) as http:
            yield WebServer(url, http)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no chromium/chromedriver on PATH: `apt-get install chromium chromium-driver` (make test does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", DESKTOP):
        options.add_argument(arg)
    # Both paths given: selenium's manager has nothing to look up, so nothing is downloaded.
    os.environ["SE_OFFLINE"] = "true"
    try:
        driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    except WebDriverException as exc:
        pytest.skip(f"chromium did not start headless: {exc.msg}")
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait(driver: Any, condition: Any, timeout_s: float = WAIT_S) -> Any:
    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(lambda d: condition(d))


def open_page(driver: Any, server: WebServer) -> None:
    """Load the page and give it the key if it asks."""
    driver.get(server.url + "/")
    wait(driver, lambda d: d.execute_script("return document.getElementById('key-dialog').open")
         or d.find_elements(By.CSS_SELECTOR, ".device-card"))  # fmt: skip
    if driver.execute_script("return document.getElementById('key-dialog').open"):
        driver.find_element(By.ID, "key-input").send_keys(KEY + "\n")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".device-card"))


def press(driver: Any, element_id: str) -> None:
    """Click a button as a user would; while the answer streams the page scrolls under the pointer, so the
    button is brought to the middle of the view first, and a click another element catches is retried."""
    from selenium.common.exceptions import ElementClickInterceptedException

    element = driver.find_element(By.ID, element_id)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    try:
        element.click()
    except ElementClickInterceptedException:
        time.sleep(0.2)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()


def read(driver: Any, selector: str, attribute: str | None = None) -> str | None:
    """An element's text or attribute in one call: the panels are redrawn on every poll, so a handle kept between
    two calls may point at a row that is gone."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "const e = document.querySelector(arguments[0]);"
        "return e === null ? null : arguments[1] ? e.getAttribute(arguments[1]) : e.textContent",
        selector, attribute,
    )  # fmt: skip


def figure(driver: Any, model: str, key: str) -> str | None:
    return read(driver, f"#live-rows tr[data-model='{model}'] [data-figure='{key}']")


def shot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_page_and_assets_load_without_a_key_while_the_data_needs_one(web_server: WebServer) -> None:
    page = httpx.get(web_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = httpx.get(web_server.url + "/ui/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(web_server.url + "/ui/stats").status_code == 401
    for path in ("/ui/..%2Fui.py", "/ui/__init__.py", "/ui/nothing.js"):
        assert httpx.get(web_server.url + path).status_code == 404, path
    stats = web_server.http.get("/ui/stats").json()["models"]
    assert set(stats) == set(MODELS)
    assert stats["smol"]["sequences"] == 2 and stats["smol"]["sequences_busy"] == 0


def test_page_asks_for_the_key_then_draws_each_device_with_the_plans_bytes(browser: Any, web_server: WebServer) -> None:
    browser.get(web_server.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait(browser, lambda d: d.execute_script("return document.getElementById('key-dialog').open"))
    shot(browser, "key-prompt")
    browser.find_element(By.ID, "key-input").send_keys("not-the-key\n")  # refused: the dialog asks again
    wait(browser, lambda d: "refused" in d.find_element(By.ID, "key-reason").text)
    browser.find_element(By.ID, "key-input").send_keys(KEY + "\n")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".device-card")) == 3)  # two RPC devices + host
    # The key is kept for the browser session only.
    assert browser.execute_script("return sessionStorage.getItem('llamasplit.apiKey')") == KEY
    assert browser.execute_script("return localStorage.length") == 0

    plans = web_server.plan()
    for alias in MODELS:
        plan = plans[alias]["plan"]
        card = browser.find_element(By.CSS_SELECTOR, f".model-card[data-model='{alias}']")
        facts = {dd.get_attribute("data-fact"): dd.text for dd in card.find_elements(By.CSS_SELECTOR, "dd")}
        assert facts["split_mode"] == plan["split_mode"] == "layer"
        assert facts["tensor_split"] == "0.6, 0.4"
        assert facts["predicted_tokens_per_s"] == f"{plan['predicted_tokens_per_s']:.0f} tokens/s"
        state = card.find_element(By.CSS_SELECTOR, ".badge").get_attribute("data-state")
        assert state == plans[alias]["status"]
        layers = []
        for device in plan["devices"]:
            row = browser.find_element(
                By.CSS_SELECTOR, f".device-card[data-device='{device['name']}'] tr[data-model='{alias}']"
            )
            cells = {td.get_attribute("data-part"): td.get_attribute("data-bytes")
                     for td in row.find_elements(By.CSS_SELECTOR, "td[data-part]")}  # fmt: skip
            for part in ("weights", "kv", "compute", "overhead", "total"):
                assert cells[part] == str(device[f"{part}_bytes"]), (alias, device["name"], part)
            layers.append(row.find_element(By.CSS_SELECTOR, "td.layers").text)
        assert layers == ["0–18", "19–29 + output"]  # the tuner's 0.6/0.4 split of 30 layers plus output
    # Every model has its segments in each device's predicted bar, sized against the device's free memory.
    first = plans["smol"]["plan"]["devices"][0]
    bar = browser.find_element(By.CSS_SELECTOR, f".device-card[data-device='{first['name']}'] [data-bar='predicted']")
    titles = [s.get_attribute("title") for s in bar.find_elements(By.CSS_SELECTOR, ".segment")]
    assert any(t.startswith("smol: weights") for t in titles) and any(t.startswith("smol-b: KV") for t in titles)
    assert titles[-1].startswith("free ")
    shot(browser, "devices-desktop")
    browser.find_element(By.ID, "zoom").click()
    shot(browser, "devices-desktop-zoomed")
    browser.find_element(By.ID, "zoom").click()

    # A phone: one column, nothing wider than the screen (tables scroll inside their cards).
    browser.set_window_size(390, 844)
    try:
        wait(browser, lambda d: d.execute_script("return document.documentElement.scrollWidth") <= 390, 5)
        shot(browser, "devices-phone")
    finally:
        browser.set_window_size(1280, 1000)


def test_chat_streams_and_stop_frees_the_sequence_on_the_server(browser: Any, web_server: WebServer) -> None:
    open_page(browser, web_server)
    Select(browser.find_element(By.ID, "model")).select_by_value("smol")
    browser.find_element(By.CSS_SELECTOR, "details summary").click()
    for field, value in (("temperature", "0"), ("max-tokens", "900")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    cancelled_before = metric_value(web_server.http.get("/metrics").text, "llamasplit_requests_cancelled_total",
                                    model="smol") or 0.0  # fmt: skip
    # Enter sends (keyboard use); a first message to an unloaded model loads it first.
    browser.find_element(By.ID, "chat-input").send_keys("Count from 1 to 500, one number per line.\n")
    answer = (By.CSS_SELECTOR, ".message.assistant")

    def answer_text(d: Any) -> str:
        return str(d.find_element(*answer).find_element(By.CSS_SELECTOR, ".body").text)

    def answer_state(d: Any) -> str | None:
        return read(d, ".message.assistant", "data-state")

    # The first tokens, or the error the page shows instead (then the assertion below prints it).
    wait(browser, lambda d: answer_text(d).strip() or answer_state(d) != "streaming", 120)
    shot(browser, "chat-first-tokens")
    assert answer_state(browser) == "streaming", browser.find_element(*answer).text
    first = answer_text(browser)
    wait(browser, lambda d: len(answer_text(d)) > len(first) + 10)  # it streams: the text grows in place
    assert answer_state(browser) == "streaming"
    assert web_server.metric("llamasplit_sequences_busy", "smol") == 1
    wait(browser, lambda d: figure(d, "smol", "sequences_busy") == "1 of 2", 10)
    shot(browser, "chat-streaming")

    press(browser, "stop")
    freed_s = wait_for(lambda: web_server.metric("llamasplit_sequences_busy", "smol") == 0, 5)
    assert web_server.metric("llamasplit_requests_cancelled_total", "smol") == cancelled_before + 1
    assert answer_state(browser) == "stopped"
    stopped_text = answer_text(browser)
    time.sleep(0.5)
    assert answer_text(browser) == stopped_text  # nothing arrives after Stop
    assert freed_s < 5

    # The live figures follow the server's metrics, and the allocated bytes appear once the model is loaded.
    wait(browser, lambda d: figure(d, "smol", "sequences_busy") == "0 of 2", 10)
    assert float(figure(browser, "smol", "generated_tokens_per_s") or 0) > 0
    assert figure(browser, "smol", "ttft_mean") not in (None, "–")
    plan = web_server.plan()["smol"]
    assert plan["status"] == "ready"
    for device in plan["plan"]["devices"]:
        selector = f".device-card[data-device='{device['name']}'] tr[data-model='smol'] td[data-part='actual']"
        expected = str(device["actual_bytes"]["total_bytes"])
        wait(browser, lambda d, s=selector, e=expected: read(d, s, "data-bytes") == e, 10)
    shot(browser, "chat-stopped")
    browser.set_window_size(390, 844)
    try:
        browser.find_element(By.ID, "chat").click()
        browser.execute_script("document.getElementById('chat').scrollIntoView()")
        shot(browser, "chat-phone")
    finally:
        browser.set_window_size(1280, 1000)


RENDER = """
const [source, done] = arguments;
import('/ui/markdown.js').then((m) => {
  const box = document.createElement('div');
  box.append(m.renderMarkdown(source));
  document.getElementById('messages').append(box);  // in the live document: an onerror would fire here
  setTimeout(() => done({
    html: box.innerHTML,
    text: box.textContent,
    active: box.querySelectorAll('script, img, iframe, svg, a, object, [onerror], [onclick], [style]').length,
    pre: [...box.querySelectorAll('pre code')].map((c) => c.textContent),
    inline: [...box.querySelectorAll(':not(pre) > code')].map((c) => c.textContent),
    strong: [...box.querySelectorAll('strong')].map((c) => c.textContent),
    em: [...box.querySelectorAll('em')].map((c) => c.textContent),
    items: [...box.querySelectorAll('li')].map((c) => c.textContent),
    pwned: window.pwned === true,
  }), 300);
});
"""


def test_markdown_shows_html_in_model_output_as_text(browser: Any, web_server: WebServer) -> None:
    open_page(browser, web_server)
    hostile = (
        "Here: <script>window.pwned = true</script> and <img src=x onerror=\"window.pwned = true\">\n\n"
        "**bold <b>x</b>** and *it* and `<i>code</i>`\n\n"
        "- one <svg onload=\"window.pwned = true\">\n- two\n\n"
        "1. first\n2. second\n\n"
        "```html\n<img src=x onerror=\"window.pwned = true\">\n```\n\n"
        "[a link](javascript:window.pwned=true)\n\n```python\nprint('still streaming')"
    )
    result = browser.execute_async_script(RENDER, hostile)
    assert result["active"] == 0 and not result["pwned"]
    assert "<script>window.pwned = true</script>" in result["text"]
    assert '<img src=x onerror="window.pwned = true">' in result["text"]
    assert "&lt;script&gt;" in result["html"]
    assert result["pre"] == ['<img src=x onerror="window.pwned = true">', "print('still streaming')"]
    assert result["inline"] == ["<i>code</i>"]
    assert result["strong"] == ["bold <b>x</b>"] and result["em"] == ["it"]
    assert result["items"] == ['one <svg onload="window.pwned = true">', "two", "first", "second"]
    assert "[a link](javascript:window.pwned=true)" in result["text"]  # links stay text
