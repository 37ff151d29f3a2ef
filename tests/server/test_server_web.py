"""The web page at / in a real browser: Debian's chromium, headless, driven by selenium, against `llamasplit serve`
on loopback with an API key and two models planned over two local RPC devices.

The page asks for the key, draws each device's bars with the plan's bytes, streams a chat, and its Stop button
frees the sequence on the server. Its accessibility is measured (browser_a11y.py): WCAG contrast of every text,
control edge and focus ring in the light and the dark colour scheme, what a screen reader is given (chromium's
accessibility tree), keyboard use, and axe-core's rules where `make test` could fetch it. Screenshots (desktop
and phone widths, both schemes, focus states) go to tests/artifacts/web/. Without chromium and chromedriver
(`make test` installs them where apt-get can) the browser tests skip and say why.
The server runs in its own process, as in test_server_rpc.py: llama.cpp's RPC client state is process-wide.
"""

from __future__ import annotations

import itertools
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
from tests.server.browser_a11y import (
    AXE_PATH,
    NON_TEXT_MIN_RATIO,
    AXTree,
    FocusRing,
    Rgba,
    TextContrast,
    active_element,
    contrast_ratio,
    control_contrasts,
    flatten,
    focus_ring,
    run_axe,
    set_colour_scheme,
    tabbable,
    text_contrasts,
)
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
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
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
        with (
            serve_cli(args, log) as url,
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http,
        ):
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
        'Here: <script>window.pwned = true</script> and <img src=x onerror="window.pwned = true">\n\n'
        "**bold <b>x</b>** and *it* and `<i>code</i>`\n\n"
        '- one <svg onload="window.pwned = true">\n- two\n\n'
        "1. first\n2. second\n\n"
        '```html\n<img src=x onerror="window.pwned = true">\n```\n\n'
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


# Accessibility, measured: contrast (WCAG 2.x 1.4.3 and 1.4.11) in both colour schemes, what a screen reader is
# given (chromium's accessibility tree), keyboard use, and axe-core where `make test` could fetch it.
SCHEMES = ("light", "dark")
KINDS_OF_TEXT = ("h1", "p#connection", "th", "summary", "textarea#chat-input", "span.who", "pre", "code", "p.note",
                 "p.error", "button#send", "span.badge", "dt", "select#model")  # fmt: skip
# A sample of what answers can hold (the model's rarely has code), drawn by the page's own renderer into a
# message built as chat.js builds one, so that code blocks and notes are measured as well.
SAMPLE = """
const done = arguments[arguments.length - 1];
import('/ui/markdown.js').then((m) => {
  const item = document.createElement('li');
  item.className = 'message assistant';
  item.dataset.sample = 'yes';
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = 'Model';
  const body = document.createElement('div');
  body.className = 'body';
  body.append(m.renderMarkdown('## Heading\\n\\nSome `inline code` and **bold**.\\n\\n#### Deeper\\n\\n'
    + '```python\\n# a comment, not a heading\\nprint(1)\\n```'));
  const note = document.createElement('p');
  note.className = 'note';
  note.textContent = 'Stopped.';
  const error = document.createElement('p');
  error.className = 'error';
  error.textContent = 'The request failed.';
  item.append(who, body, note, error);
  document.getElementById('message-list').append(item);
  done();
});
"""


def keys(driver: Any, *sequence: str) -> None:
    """Keys pressed on whatever has focus, as a keyboard user types them."""
    ActionChains(driver).send_keys(*sequence).perform()


def chat_once(driver: Any, prompt: str, max_tokens: int) -> None:
    """Send a prompt to smol with temperature 0 and wait for the answer to end."""
    Select(driver.find_element(By.ID, "model")).select_by_value("smol")
    driver.execute_script("document.querySelector('#chat details').open = true")
    for field, value in (("temperature", "0"), ("max-tokens", str(max_tokens))):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.ID, "chat-input").send_keys(prompt + "\n")
    wait(driver, lambda d: read(d, ".message.assistant", "data-state") not in (None, "streaming"), 120)
    assert read(driver, ".message.assistant", "data-state") == "done"


def test_contrast_arithmetic_matches_wcag_reference_values() -> None:
    black, white = Rgba(0, 0, 0), Rgba(255, 255, 255)
    assert contrast_ratio(black, white) == pytest.approx(21.0)
    assert contrast_ratio(white, white) == pytest.approx(1.0)
    assert contrast_ratio(Rgba(0x76, 0x76, 0x76), white) == pytest.approx(4.54, abs=0.01)  # the AA grey
    assert contrast_ratio(Rgba(0x94, 0x94, 0x94), white) == pytest.approx(3.03, abs=0.01)  # the 3:1 grey
    # Half-transparent black text on white is seen as mid grey: compositing comes before the ratio.
    assert Rgba(0, 0, 0, 0.5).over(white) == Rgba(127.5, 127.5, 127.5)
    assert flatten([Rgba(0, 0, 0, 0.5), Rgba(255, 255, 255, 0.5), black]) == Rgba(63.75, 63.75, 63.75)
    large_bold = TextContrast("h1", "x", black, white, None, size_px=19.0, weight=700)
    small_bold = TextContrast("b", "x", black, white, None, size_px=16.0, weight=700)
    assert large_bold.required == 3.0 and small_bold.required == 4.5


def test_every_text_and_control_meets_wcag_contrast_in_both_colour_schemes(browser: Any, web_server: WebServer) -> None:
    open_page(browser, web_server)
    chat_once(browser, "Say hello.", 12)
    browser.execute_async_script(SAMPLE)
    failures: list[str] = []
    try:
        for scheme in SCHEMES:
            set_colour_scheme(browser, scheme)
            assert browser.execute_script(f"return matchMedia('(prefers-color-scheme: {scheme})').matches")
            texts = text_contrasts(browser)
            # The walk saw the page's kinds of text: a check that measured nothing would pass anything.
            seen = " ".join(text.where for text in texts)
            for expected in KINDS_OF_TEXT:
                assert expected in seen, (scheme, expected, seen)
            failures += [f"{scheme}: {text}" for text in texts if text.ratio < text.required]
            controls = control_contrasts(browser)
            assert {"textarea#chat-input", "select#model", "input#temperature", "button#new-chat"} <= {
                c.where for c in controls
            }
            failures += [f"{scheme}: {c}" for c in controls if c.ratio < NON_TEXT_MIN_RATIO]
            lowest = min(texts, key=lambda text: text.ratio / text.required)
            print(f"{scheme}: {len(texts)} texts, lowest {lowest}; {len(controls)} controls, lowest "
                  f"{min(controls, key=lambda c: c.ratio)}")  # fmt: skip
            shot(browser, f"contrast-{scheme}")
    finally:
        set_colour_scheme(browser, None)
    assert not failures, "\n".join(failures)


def test_tab_order_reaches_every_control_with_a_visible_focus_ring(browser: Any, web_server: WebServer) -> None:
    open_page(browser, web_server)
    browser.refresh()  # focus navigation starts again at the top of the page
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".device-card"))
    browser.execute_script("document.querySelector('#chat details').open = true")
    expected = tabbable(browser)
    assert {"send", "chat-input", "model", "temperature", "max-tokens", "system-prompt", "zoom", "new-chat",
            "forget-key", "messages"} <= set(expected)  # fmt: skip
    failures: list[str] = []
    try:
        for scheme in SCHEMES:
            set_colour_scheme(browser, scheme)
            browser.refresh()
            wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".device-card"))
            browser.execute_script("document.querySelector('#chat details').open = true")
            reached: list[str] = []
            rings: list[FocusRing] = []
            # Tab until focus comes back round (or leaves for the browser's own controls): one lap of the page.
            for _ in range(len(expected) + 5):
                keys(browser, Keys.TAB)
                current = active_element(browser)
                if current is None or current in reached:
                    break
                reached.append(current)
                ring = focus_ring(browser)
                assert ring is not None
                rings.append(ring)
                if not ring.visible:
                    failures.append(f"{scheme}: {ring}")
                if current == "a.skip":
                    failures += [f"{scheme}: {t}" for t in text_contrasts(browser, "a.skip") if t.ratio < t.required]
                    shot(browser, f"focus-skip-link-{scheme}")
                if current == "send":
                    shot(browser, f"focus-send-{scheme}")
            print(f"{scheme}: {len(reached)} tab stops {reached}; weakest ring {min(rings, key=lambda r: r.ratio)}")
            assert reached[0] == "a.skip", reached  # the first stop skips the device panels
            assert set(expected) <= set(reached), (scheme, set(expected) - set(reached))
    finally:
        set_colour_scheme(browser, None)
    assert not failures, "\n".join(failures)
    # The skip link lands in the chat: the next stop is the model picker.
    browser.refresh()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".device-card"))
    keys(browser, Keys.TAB)
    assert active_element(browser) == "a.skip"
    keys(browser, Keys.ENTER)
    wait(browser, lambda d: active_element(d) == "chat", 5)
    keys(browser, Keys.TAB)
    assert active_element(browser) == "model"


def bar_figures(driver: Any) -> list[dict[str, Any]]:
    """Each bar's text alternative beside the figures its device's table shows (what a sighted user reads)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        """
        return [...document.querySelectorAll('.device-card [data-bar]')].map((bar) => {
          const card = bar.closest('.device-card');
          const rows = [...card.querySelectorAll('tbody tr')].map((tr) => ({
            model: tr.dataset.model,
            cells: Object.fromEntries([...tr.querySelectorAll('td[data-part]')]
              .map((td) => [td.dataset.part, {text: td.textContent, bytes: td.dataset.bytes ?? null}])),
          }));
          return {device: card.dataset.device, bar: bar.dataset.bar, label: bar.getAttribute('aria-label'), rows};
        });
        """
    )


def test_screen_reader_gets_names_roles_an_outline_and_the_bars_figures(browser: Any, web_server: WebServer) -> None:
    assert web_server.http.post("/models/load", json={"model": "smol"}).status_code == 200
    open_page(browser, web_server)
    wait(browser, lambda d: read(d, ".model-card[data-model='smol'] .badge", "data-state") == "ready")
    browser.execute_script("document.querySelector('#chat details').open = true")
    browser.execute_async_script(SAMPLE)
    tree = AXTree(browser)

    # Every control a keyboard reaches has a role and a name; these are the names a screen reader says.
    for node in tree.exposed():
        if node.properties.get("focusable") and node.role != "RootWebArea":
            assert node.role not in ("generic", "none", ""), tree.describe(node)
            assert node.name.strip(), f"{tree.describe(node)} ({node.role}) has no accessible name"
    names = {"model": ("combobox", "Model"), "chat-input": ("textbox", "Message"),
             "system-prompt": ("textbox", "System prompt"), "temperature": ("spinbutton", "Temperature"),
             "max-tokens": ("spinbutton", "Max tokens"), "zoom": ("checkbox", "Scale bars to the models' memory"),
             "send": ("button", "Send"), "stop": ("button", "Stop"), "new-chat": ("button", "New chat"),
             "forget-key": ("button", "Forget API key"), "messages": ("log", "Conversation")}  # fmt: skip
    for element_id, (role, name) in names.items():
        node = tree.of(f"#{element_id}")
        assert (node.role, node.name) == (role, name), element_id
    assert tree.of("#chat details summary").name == "Parameters"

    # The conversation and the status lines are live regions: what arrives there is read out.
    assert tree.of("#messages").properties.get("live") == "polite"
    for status in ("#chat-status", "#connection"):
        node = tree.of(status)
        assert (node.role, node.properties.get("live")) == ("status", "polite"), status

    # Headings form an outline: one h1 first, then no level skipped on the way down.
    outline = [(int(node.properties["level"]), node.name) for node in tree.exposed() if node.role == "heading"]
    levels = [level for level, _ in outline]
    assert levels[0] == 1 and levels.count(1) == 1, outline
    assert all(b <= a + 1 for a, b in itertools.pairwise(levels)), outline
    device_names = browser.execute_script("return [...document.querySelectorAll('.device-card h3')].length")
    assert device_names == 3 and levels.count(3) == 3 + 1, outline  # two RPC devices, the host, the answer
    # An answer's "## Heading" goes under the page's "Chat" h2 as an h3, its "####" as the next level down.
    assert outline[-2:] == [(3, "Heading"), (4, "Deeper")], outline
    code = tree.of("li[data-sample] pre")
    assert (code.role, code.name) == ("group", "code, python")

    # Each bar is an image whose name carries the figures its table shows, model by model, part by part.
    bars = bar_figures(browser)
    assert len(bars) == 6
    words = {"weights": "weights", "kv": "KV", "compute": "compute", "overhead": "overhead"}
    for bar in bars:
        node = tree.of(f".device-card[data-device='{bar['device']}'] [data-bar='{bar['bar']}']")
        print(f"{bar['device']} [{node.role}] {node.name}")
        assert node.role == "image" and node.name == bar["label"], (node.role, node.name, bar["label"])
        said = dict(part.split(" ", 1) for part in node.name.split(": ", 1)[1].split("; ") if " " in part)
        for row in bar["rows"]:
            cells = row["cells"]
            if bar["bar"] == "predicted":
                spoken = said[row["model"]]
                assert spoken.startswith(cells["total"]["text"]), (bar, spoken)
                for part, word in words.items():
                    if part in cells and cells[part]["bytes"] not in (None, "0"):
                        assert f"{word} {cells[part]['text']}" in spoken, (bar, part, spoken)
            elif cells["actual"]["bytes"] is not None:
                assert said[row["model"]].startswith(cells["actual"]["text"]), (bar, said)
        visible_total = browser.execute_script(
            "return arguments[0].closest('.bar-row').querySelector('.bar-total').textContent",
            browser.find_element(By.CSS_SELECTOR, f".device-card[data-device='{bar['device']}'] "
                                                  f"[data-bar='{bar['bar']}']"),
        )  # fmt: skip
        assert f"total {visible_total}" in node.name or visible_total == "–", (node.name, visible_total)
    # The model not loaded is faded on screen, and said to be so.
    predicted = next(bar for bar in bars if bar["bar"] == "predicted")
    if web_server.plan()["smol-b"]["status"] != "ready":
        assert "(not loaded)" in predicted["label"].split("smol-b ", 1)[1].split(";")[0], predicted["label"]


def test_streamed_answer_is_in_a_live_region_and_stop_is_reached_and_pressed_by_keyboard(
    browser: Any, web_server: WebServer
) -> None:
    open_page(browser, web_server)
    Select(browser.find_element(By.ID, "model")).select_by_value("smol")
    browser.execute_script("document.querySelector('#chat details').open = true")
    for field, value in (("temperature", "0"), ("max-tokens", "900")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    cancelled_before = (
        metric_value(web_server.http.get("/metrics").text, "llamasplit_requests_cancelled_total", model="smol") or 0.0
    )
    browser.find_element(By.ID, "chat-input").send_keys("Count from 1 to 500, one number per line.")
    keys(browser, Keys.TAB)
    assert active_element(browser) == "send"
    keys(browser, Keys.ENTER)
    # Send is disabled while the answer streams: focus goes on to Stop rather than back to the top of the page.
    wait(browser, lambda d: read(d, ".message.assistant .body", None), 120)
    assert read(browser, ".message.assistant", "data-state") == "streaming"
    assert active_element(browser) == "stop"
    # From the message box too, Tab goes straight to Stop while Send is disabled.
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
    assert active_element(browser) == "chat-input"
    keys(browser, Keys.TAB)
    assert active_element(browser) == "stop"
    ring = focus_ring(browser)
    assert ring is not None and ring.visible, ring
    stop_texts = text_contrasts(browser, "#stop")
    assert stop_texts and all(t.ratio >= t.required for t in stop_texts), [str(t) for t in stop_texts]
    shot(browser, "keyboard-stop-focused")

    tree = AXTree(browser)
    answer = tree.of(".message.assistant")
    assert answer.role == "listitem" and not answer.ignored, answer.role  # counted among the messages
    region = next((n for n in answer.ancestors() if n.properties.get("live") in ("polite", "assertive")), None)
    assert region is not None and region.role == "log", "the streamed answer is not inside a live region"
    # Busy while it streams: screen readers read the answer once it ends instead of a word at a time.
    assert answer.properties.get("busy")
    assert answer.text().strip(), "the answer's text is not in the accessibility tree"

    keys(browser, Keys.SPACE)
    wait_for(lambda: web_server.metric("llamasplit_sequences_busy", "smol") == 0, 5)
    assert web_server.metric("llamasplit_requests_cancelled_total", "smol") == cancelled_before + 1
    assert read(browser, ".message.assistant", "data-state") == "stopped"
    wait(browser, lambda d: active_element(d) == "chat-input", 5)  # ready for the next message
    tree = AXTree(browser)
    answer = tree.of(".message.assistant")
    assert not answer.properties.get("busy")
    assert "Stopped" in tree.of("#chat-status").text()


def test_key_prompt_is_announced_as_a_modal_dialog_with_focus_inside(browser: Any, web_server: WebServer) -> None:
    browser.get(web_server.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait(browser, lambda d: d.execute_script("return document.getElementById('key-dialog').open"))
    tree = AXTree(browser)
    dialog = tree.of("#key-dialog")
    assert (dialog.role, dialog.name, dialog.properties.get("modal")) == ("dialog", "API key", True)
    assert "requires an API key" in dialog.description
    focused = [node for node in tree.exposed() if node.properties.get("focused") and node.role != "RootWebArea"]
    assert len(focused) == 1 and (focused[0].role, focused[0].name) == ("textbox", "Key"), focused
    assert dialog in focused[0].ancestors()
    # Behind a modal dialog the page is inert: a screen reader cannot wander into it, nor can Tab.
    for behind in ("#send", "#chat-input", "#devices"):
        node = tree.find(behind)
        assert node is None or node.ignored, behind
    for _ in range(4):
        keys(browser, Keys.TAB)
        assert active_element(browser) in ("key-input", "key-submit", None)
    failures: list[str] = []
    try:
        for scheme in SCHEMES:
            set_colour_scheme(browser, scheme)
            texts = text_contrasts(browser, "#key-dialog")
            assert any(t.where.endswith("p#key-reason") for t in texts)
            failures += [f"{scheme}: {t}" for t in texts if t.ratio < t.required]
            failures += [f"{scheme}: {c}" for c in control_contrasts(browser, "#key-dialog")
                         if c.ratio < NON_TEXT_MIN_RATIO]  # fmt: skip
            shot(browser, f"key-prompt-{scheme}")
    finally:
        set_colour_scheme(browser, None)
    assert not failures, "\n".join(failures)
    browser.find_element(By.ID, "key-input").send_keys(KEY + "\n")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".device-card"))


# Counts changes inside the page's live regions until the page has polled /ui/stats twice more.
QUIET = """
const done = arguments[arguments.length - 1];
let changes = 0;
const observer = new MutationObserver((records) => { changes += records.length; });
for (const region of document.querySelectorAll('[role=status], [role=log], [role=alert], [aria-live]')) {
  observer.observe(region, {childList: true, subtree: true, characterData: true});
}
let polls = 0;
new PerformanceObserver((list) => {
  polls += list.getEntries().filter((e) => e.name.endsWith('/ui/stats')).length;
  if (polls >= 2) setTimeout(() => { observer.disconnect(); done({changes, polls}); }, 200);
}).observe({type: 'resource'});
"""


def test_live_regions_stay_quiet_while_nothing_changes(browser: Any, web_server: WebServer) -> None:
    open_page(browser, web_server)
    wait(browser, lambda d: read(d, "#connection") == "connected")
    result = browser.execute_async_script(QUIET)
    # Rewriting a status with the same words makes some screen readers say it again, every poll.
    assert result["changes"] == 0, result


OVERFLOWING_TABLES_ARE_TAB_STOPS = """
const boxes = [...document.querySelectorAll('.table-wrap')];
return boxes.length === 4 && boxes.every((box) => (box.scrollWidth > box.clientWidth) === (box.tabIndex === 0));
"""


def test_axe_core_finds_no_wcag_violations_in_either_colour_scheme_on_desktop_and_phone(
    browser: Any, web_server: WebServer
) -> None:
    if not AXE_PATH.is_file():
        pytest.skip(f"no axe-core at {AXE_PATH.relative_to(ROOT)}: `make test` fetches it with npm where it can")
    open_page(browser, web_server)
    chat_once(browser, "Say hello.", 12)
    browser.execute_async_script(SAMPLE)
    found: list[str] = []
    try:
        for width, height in ((1280, 1000), (390, 844)):  # on a phone the device tables scroll sideways
            browser.set_window_size(width, height)
            # A table that overflows its card is a tab stop (the arrow keys scroll it); one that fits is not.
            wait(browser, lambda d: d.execute_script(OVERFLOWING_TABLES_ARE_TAB_STOPS), 5)
            for scheme in SCHEMES:
                set_colour_scheme(browser, scheme)
                for violation in run_axe(browser):
                    found.append(f"{scheme}, {width}px: {violation['id']} ({violation['impact']}): "
                                 f"{violation['help']}\n    " + "\n    ".join(violation["nodes"]))  # fmt: skip
    finally:
        set_colour_scheme(browser, None)
        browser.set_window_size(1280, 1000)
    assert not found, "\n".join(found)


def test_page_reflows_to_320_css_pixels_without_sideways_scrolling(browser: Any, web_server: WebServer) -> None:
    # WCAG 2.x 1.4.10: at 320 CSS px (1280 px zoomed to 400 %) nothing but the wide tables scrolls sideways.
    open_page(browser, web_server)
    browser.set_window_size(320, 800)
    try:
        width = browser.execute_script("return window.innerWidth")
        assert width <= 320, width
        wait(browser, lambda d: d.execute_script("return document.documentElement.scrollWidth") <= width, 5)
        shot(browser, "reflow-320px")
    finally:
        browser.set_window_size(1280, 1000)


GRAPHIC_COLOURS = """
const paint = (selector) => [...document.querySelectorAll(selector)]
  .map((e) => `${getComputedStyle(e).backgroundColor} ${getComputedStyle(e).backgroundImage}`);
return {keys: paint('.legend .key'), segments: paint('.segment'), swatches: paint('.model-card .swatch'),
        canvas: getComputedStyle(document.body).backgroundColor};
"""


def test_bars_keep_their_colours_in_a_forced_colours_theme(browser: Any, web_server: WebServer) -> None:
    # Windows' high-contrast themes force every background to one colour; the bars are data and must stay drawn.
    open_page(browser, web_server)
    normal = browser.execute_script(GRAPHIC_COLOURS)
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"media": "", "features": [{"name": "forced-colors", "value": "active"}]}
    )
    try:
        assert browser.execute_script("return matchMedia('(forced-colors: active)').matches")
        forced = browser.execute_script(GRAPHIC_COLOURS)
        shot(browser, "forced-colours")
    finally:
        set_colour_scheme(browser, None)
    assert forced["canvas"] != normal["canvas"]  # the theme did take over the page's own colours
    for part in ("keys", "segments", "swatches"):
        assert forced[part] == normal[part] and len(set(forced[part])) > 1, (part, forced[part])
