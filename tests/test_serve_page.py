"""The chat page of `ftune serve` (finetune_cli/serving/page/) driven in headless Chromium against the real app,
served in this process over a tiny untied model under two names: the streamed reply the page shows equals the API's
own (non-streamed, greedy) answer to the same messages, earlier turns go back in `messages`, ratings and side-by-side
choices land in --log-requests' feedback.jsonl, the stop button ends a generation, errors show in the status line,
the key is asked for and kept in the tab only, and user or model text containing markup is shown as text."""

import json
import time

import httpx
import pytest

from tests.conftest import tiny_model
from tests.test_serve import KEY, InProcess

XSS = '<img src=x onerror="window.__xss=1">'
SYSTEM = "You are terse."
# Before any page script: record Content-Security-Policy violations (an inline style or script the page would add).
WATCH_CSP = (
    "window.__csp = []; document.addEventListener('securitypolicyviolation', "
    "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """Untied: a tied tiny model repeats the prompt's last token, so its greedy replies are blank."""
    return tiny_model(tmp_path_factory.mktemp("page-untied"), tokenizer, tied=False)


@pytest.fixture(scope="module")
def keyed(model_dir, tmp_path_factory):
    """`ftune serve a=DIR b=DIR --api-key KEY --log-requests LOG` (one model loaded, served under two names)."""
    log_dir = tmp_path_factory.mktemp("page") / "served"
    srv = InProcess(model_dir, 2_000_000, [f"a={model_dir}", f"b={model_dir}"], log_dir=log_dir)
    srv.log_dir = log_dir
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(browser):
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_CSP})
    browser.set_window_size(1200, 900)
    return browser


# --- driving the page ------------------------------------------------------------------------------------------------


def find(browser, testid: str, within=None):
    from selenium.webdriver.common.by import By

    return (within or browser).find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def find_all(browser, testid: str, within=None) -> list:
    from selenium.webdriver.common.by import By

    return (within or browser).find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def until(browser, condition, what: str, timeout: float = 20):
    """Poll `condition(browser)` until it is truthy; its value. On timeout, the page's status line says why."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        raise AssertionError(f"{what}; the page's status line: {find(browser, 'status').text!r}") from None


def open_page(browser, srv) -> None:
    """The page in a fresh state: this tab's sessionStorage (the key) cleared."""
    browser.get(srv.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(srv.url + "/")


def model_names(browser, testid: str = "model") -> list[str]:
    return browser.execute_script("return Array.from(arguments[0].options).map(o => o.value)", find(browser, testid))


def settings(browser, temperature: str, max_tokens: str, system: str = "") -> None:
    for testid, value in (("temperature", temperature), ("max-tokens", max_tokens), ("system", system)):
        field = find(browser, testid)
        field.clear()
        if value:
            field.send_keys(value)


def send(browser, *keys) -> None:
    """Type into the prompt and press Enter (the keyboard sends)."""
    from selenium.webdriver.common.keys import Keys

    find(browser, "prompt").send_keys(*keys, Keys.ENTER)


def finished(browser, count: int, states=("done",)) -> list:
    """Wait for `count` replies, each in one of `states`; the reply elements."""

    def ready(b):
        replies = find_all(b, "reply")
        return replies if len(replies) == count and all(r.get_attribute("data-state") in states for r in replies) else 0

    return until(browser, ready, f"{count} replies did not reach {states}")


def shown(browser, element) -> str:
    """An element's text as the DOM holds it (textContent: exact, whitespace and all)."""
    return browser.execute_script("return arguments[0].textContent", element)


def reply_text(browser, reply) -> str:
    from selenium.webdriver.common.by import By

    return shown(browser, reply.find_element(By.CSS_SELECTOR, ".text"))


def pressed(button) -> bool:
    return button.get_attribute("aria-pressed") == "true"


def api_reply(srv, model: str, messages: list[dict], max_tokens: int, key: str | None = KEY) -> str:
    """The server's non-streamed greedy answer to the same messages (plain HTTP, not the page)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    with httpx.Client(base_url=srv.url, headers=headers, trust_env=False, timeout=60) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def logged_line(path, want: dict, timeout: float = 10) -> dict:
    """The line of a log file holding `want`'s items, once it is there."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in lines(path):
            if want.items() <= line.items():
                return line
        time.sleep(0.05)
    raise AssertionError(f"no line with {want} in {path}: {lines(path)}")


def slow_tokens(monkeypatch, seconds: float, fail_after: int | None = None) -> None:
    """Each token takes `seconds` (so a stream arrives in visible pieces and can be stopped midway); with
    `fail_after`, a generation fails at that token (an error event mid-stream)."""
    from finetune_cli.inference import batching

    real = batching._next_token

    def next_token(logits, seq):
        time.sleep(seconds)
        if fail_after is not None and len(seq.tokens) >= fail_after:
            raise RuntimeError("injected fault")
        return real(logits, seq)

    monkeypatch.setattr(batching, "_next_token", next_token)


def markup_in_replies(monkeypatch) -> None:
    """Every piece of reply text the server sends (streamed or whole) carries the markup after it."""
    from finetune_cli.serving import engine

    real = engine.Text.feed

    def feed(self, tokens):
        delta, stopped = real(self, tokens)
        return (delta + XSS if delta else delta), stopped

    monkeypatch.setattr(engine.Text, "feed", feed)


def assert_safe(browser) -> None:
    """No markup of a user or model became an element or ran, and the page broke none of its CSP."""
    from selenium.webdriver.common.by import By

    assert browser.execute_script("return typeof window.__xss") == "undefined"
    assert not browser.find_elements(By.CSS_SELECTOR, "main img, main script")
    assert browser.execute_script("return window.__csp") == []


# --- the tests -------------------------------------------------------------------------------------------------------


def test_keyed_chat_streams_rates_and_sends_history(page, keyed, monkeypatch):
    """Ask for the key (a wrong one asked again), stream a reply equal to the API's, rate it into feedback.jsonl,
    then a second turn carrying the first; the key stays in this tab's sessionStorage only."""
    browser, feedback = page, keyed.log_dir / "feedback.jsonl"
    open_page(browser, keyed)
    key = find(browser, "key")
    assert key.is_displayed() and key.get_attribute("type") == "password"
    until(browser, lambda b: "API key" in find(b, "status").text, "the page did not ask for the key")
    assert model_names(browser) == []  # /v1/models needs the key

    key.send_keys("sk-wrong")
    find(browser, "key").submit()
    until(browser, lambda b: "401" in find(b, "status").text, "a wrong key was not reported")
    assert find(browser, "key").get_attribute("value") == "" and model_names(browser) == []
    find(browser, "key").send_keys(KEY)
    find(browser, "key").submit()
    until(browser, lambda b: model_names(b) == ["a", "b"], "the models did not load with the key")

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    settings(browser, "0", "16", SYSTEM)
    browser.execute_script(  # every length the first reply's text takes while it streams
        "window.__lengths = new Set(); new MutationObserver(() => { const t = document.querySelector("
        "'[data-testid=reply] .text'); if (t) window.__lengths.add(t.textContent.length); })"
        ".observe(document.body, {subtree: true, childList: true, characterData: true});"
    )
    slow_tokens(monkeypatch, 0.01)
    first = f"Hello {XSS}\nsecond line"
    find(browser, "prompt").send_keys(f"Hello {XSS}")
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()  # a new line
    assert find_all(browser, "reply") == []
    send(browser, "second line")
    (reply,) = finished(browser, 1)
    asked = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first}]
    text = reply_text(browser, reply)
    assert text and text == api_reply(keyed, "a", asked, 16)
    assert len(browser.execute_script("return Array.from(window.__lengths).filter(n => n > 0)")) > 2  # streamed
    assert reply.get_attribute("data-model") == "a"
    reply_id = reply.get_attribute("data-id")
    assert reply_id.startswith("chatcmpl-")
    (user,) = find_all(browser, "user")
    assert shown(browser, user) == first  # the markup shown as text
    assert_safe(browser)

    up, down = find(browser, "up", reply), find(browser, "down", reply)
    assert not pressed(up) and not pressed(down) and not find_all(browser, "better")  # no pair, no "better"
    up.click()
    until(browser, lambda b: pressed(up), "the rating was not shown as accepted")
    assert logged_line(feedback, {"id": reply_id})["rating"] == 1 and not pressed(down)

    send(browser, "Go on.")
    replies = finished(browser, 2)
    second_id = replies[1].get_attribute("data-id")
    record = logged_line(keyed.log_dir / "requests.jsonl", {"id": second_id})
    history = asked + [{"role": "assistant", "content": text}, {"role": "user", "content": "Go on."}]
    assert record["messages"] == history and record["settings"]["temperature"] == 0
    assert reply_text(browser, replies[1]) == api_reply(keyed, "a", history, 16) == record["reply"]

    # The key: in this tab's sessionStorage, never in a cookie, localStorage or the URL; a reload keeps it.
    assert browser.execute_script("return sessionStorage.getItem('ftune.apiKey')") == KEY
    assert browser.execute_script("return document.cookie + localStorage.length") == "0"
    browser.refresh()
    until(browser, lambda b: model_names(b) == ["a", "b"], "a reload lost the key")
    assert KEY not in browser.current_url and find_all(browser, "reply") == []

    with httpx.Client(base_url=keyed.url, headers={"Authorization": f"Bearer {KEY}"}, trust_env=False) as http:
        bad = http.post("/v1/feedback", json={"id": reply_id, "rating": 2})
    assert bad.status_code == 400 and bad.json()["error"]["message"]


def test_side_by_side_better_and_stop(page, keyed, monkeypatch):
    """Each message goes to both models at once; "this one is better" lands as a better_than line; Stop ends both
    streams (nothing logged for them) and the page can send again."""
    from selenium.webdriver.support.ui import Select

    browser, feedback = page, keyed.log_dir / "feedback.jsonl"
    open_page(browser, keyed)
    find(browser, "key").send_keys(KEY)
    find(browser, "key").submit()
    until(browser, lambda b: model_names(b) == ["a", "b"], "the models did not load")
    assert not find(browser, "model-b").is_displayed()
    find(browser, "compare").click()
    assert find(browser, "model-b").is_displayed() and model_names(browser, "model-b") == ["a", "b"]
    Select(find(browser, "model-b")).select_by_value("b")
    settings(browser, "0", "12")

    send(browser, "Which is better?")
    left, right = finished(browser, 2)
    asked = [{"role": "user", "content": "Which is better?"}]
    assert [left.get_attribute("data-model"), right.get_attribute("data-model")] == ["a", "b"]
    for reply in (left, right):
        assert reply_text(browser, reply) == api_reply(keyed, reply.get_attribute("data-model"), asked, 12)
    a_id, b_id = left.get_attribute("data-id"), right.get_attribute("data-id")
    assert a_id != b_id
    better = find(browser, "better", right)
    better.click()
    until(browser, lambda b: pressed(better), "the choice was not shown as accepted")
    assert logged_line(feedback, {"id": b_id, "better_than": a_id})
    assert not pressed(find(browser, "better", left))

    slow_tokens(monkeypatch, 0.05)  # 2 x 200 tokens would take 20 s: Stop ends both first
    settings(browser, "0", "200")
    send(browser, "Tell me a long story.")
    until(browser, lambda b: any(reply_text(b, r) for r in find_all(b, "reply")[2:]), "no text streamed")
    find(browser, "stop").click()
    stopped = finished(browser, 4, states=("done", "stopped"))[2:]
    assert [r.get_attribute("data-state") for r in stopped] == ["stopped", "stopped"]
    ids = [r.get_attribute("data-id") for r in stopped]
    until(browser, lambda b: keyed.text().count("finish=cancelled") >= 2, "the server did not cancel the streams")
    assert not {r["id"] for r in lines(keyed.log_dir / "requests.jsonl")} & set(ids)
    assert find(browser, "stop").get_attribute("disabled") and not find(browser, "send").get_attribute("disabled")
    assert_safe(browser)


def test_without_a_key_and_errors(page, model_dir, monkeypatch):
    """A server without a key or a log: no key field, no rating buttons, chat works; a refused request and an error
    in mid-stream both show in the status line as text."""
    srv = InProcess(model_dir, 2_000_000, [f"c={model_dir}"], key=None)
    try:
        browser = page
        open_page(browser, srv)
        until(browser, lambda b: model_names(b) == ["c"], "the models did not load")
        assert not find(browser, "key").is_displayed()
        markup_in_replies(monkeypatch)
        settings(browser, "0", "8")
        send(browser, "Hi")
        (reply,) = finished(browser, 1)
        asked = [{"role": "user", "content": "Hi"}]
        text = reply_text(browser, reply)
        assert XSS in text and text == api_reply(srv, "c", asked, 8, key=None)
        assert not find_all(browser, "up") and not find_all(browser, "down")  # /health: feedback false

        settings(browser, "0", "100000")  # more than the context: a 400 before streaming
        send(browser, "Too long")
        until(browser, lambda b: "400" in find(b, "status").text, "the refusal was not shown")
        assert "max_tokens" in find(browser, "status").text and len(find_all(browser, "reply")) == 1
        assert find(browser, "prompt").get_attribute("value") == "Too long"  # kept to send again

        slow_tokens(monkeypatch, 0.01, fail_after=3)
        settings(browser, "0", "8")
        find(browser, "prompt").clear()
        send(browser, "Fail midway")
        finished(browser, 2, states=("done", "error"))
        assert "generation failed" in find(browser, "status").text
        assert find_all(browser, "reply")[1].get_attribute("data-state") == "error"
        assert_safe(browser)
    finally:
        srv.stop()
