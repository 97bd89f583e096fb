"""`ftune serve` for the people who run it: `/metrics` read back with prometheus_client's own parser, the
`--log-requests` folder (each finished request one line, equal to what the client got), POST /v1/feedback and its
4xx, the origin and CORS rules, and the chat page's files with their security headers. The tiny untied model served
in this process as two names (`a` and `b`), with a key."""

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import tiny_model
from tests.test_serve import InProcess, _error

SYSTEM = "You are terse."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return tiny_model(tmp_path_factory.mktemp("ops-untied"), tokenizer, tied=False)


@pytest.fixture(scope="module")
def srv(model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("ops") / "served"
    server = InProcess(
        model_dir, 2_000_000, [f"a={model_dir}", f"b={model_dir}"], log_dir=log_dir, cors_origins=["https://ok.test"]
    )
    server.log_dir = log_dir
    yield server
    server.stop()


def chat(srv, model: str, text: str, stream: bool = False, **extra) -> dict:
    """One chat request (greedy); the reply as {"id", "text", "usage"} however it came."""
    body = {"model": model, "messages": [{"role": "developer", "content": SYSTEM}, {"role": "user", "content": text}]}
    body.update({"max_tokens": 12, "temperature": 0, **extra})
    with srv.http() as http:
        if not stream:
            out = http.post("/v1/chat/completions", json=body).json()
            return {"id": out["id"], "text": out["choices"][0]["message"]["content"], "usage": out["usage"]}
        body["stream_options"] = {"include_usage": True}
        lines = http.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert len({c["id"] for c in chunks}) == 1
    return {"id": chunks[0]["id"], "text": text, "usage": chunks[-1]["usage"]}


def logged(srv) -> dict[str, dict]:
    path = srv.log_dir / "requests.jsonl"
    return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def feedback_lines(srv) -> list[dict]:
    path = srv.log_dir / "feedback.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_each_finished_request_is_one_line_equal_to_the_reply(srv):
    plain = chat(srv, "a", "Name a color.")
    streamed = chat(srv, "b", "Name a fruit.", stream=True, seed=7, stop=["zzz"])
    with srv.http() as http:
        completion = http.post("/v1/completions", json={"model": "a", "prompt": "Once upon", "max_tokens": 5}).json()
    records = logged(srv)
    assert {plain["id"], streamed["id"], completion["id"]} <= set(records)
    for reply, model, question in ((plain, "a", "Name a color."), (streamed, "b", "Name a fruit.")):
        record = records[reply["id"]]
        assert record["model"] == model and record["endpoint"] == "chat"
        assert record["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        assert record["reply"] == reply["text"]
        assert record["prompt_tokens"] == reply["usage"]["prompt_tokens"]
        assert record["completion_tokens"] == reply["usage"]["completion_tokens"]
        assert record["finish_reason"] in ("stop", "length") and 0 < record["latency_s"] < 60
        assert record["time"].endswith("Z")
    assert records[streamed["id"]]["settings"] == {
        "temperature": 0.0,
        "top_p": None,
        "max_tokens": 12,
        "seed": 7,
        "stop": ["zzz"],
    }
    text = records[completion["id"]]
    assert text["endpoint"] == "completions" and text["prompt"] == "Once upon"
    assert text["reply"] == completion["choices"][0]["text"] and "messages" not in text
    if streamed["text"]:
        assert 0 < records[streamed["id"]]["time_to_first_token_s"] <= records[streamed["id"]]["latency_s"]
    assert f"id={plain['id']}" in srv.text()  # the stderr line names the completion, to find it in the log


def test_feedback_is_stored_and_bad_bodies_are_4xx(srv):
    first = chat(srv, "a", "Say yes.")
    other = chat(srv, "b", "Say yes.")
    unrelated = chat(srv, "a", "Say no.")
    before = len(feedback_lines(srv))
    with srv.http() as http, srv.http(key=None) as anonymous:
        ok = http.post("/v1/feedback", json={"id": first["id"], "rating": 1, "comment": "good <b>one</b>"})
        assert ok.status_code == 200 and ok.json() == {"object": "feedback", "id": first["id"]}
        assert http.post("/v1/feedback", json={"id": other["id"], "better_than": first["id"]}).status_code == 200
        assert http.post("/v1/feedback", json={"id": first["id"], "rating": -1}).status_code == 200
        _error(http.post("/v1/feedback", json={"id": "chatcmpl-nope", "rating": 1}), 404, "id", "reply_not_found")
        _error(http.post("/v1/feedback", json={"id": first["id"], "better_than": "x"}), 404, "better_than",
               "reply_not_found")  # fmt: skip
        assert "different messages" in _error(
            http.post("/v1/feedback", json={"id": first["id"], "better_than": unrelated["id"]}), 400, "better_than"
        )
        for bad in (
            {"id": first["id"], "rating": 2},
            {"id": first["id"], "rating": True},
            {"id": first["id"], "rating": "1"},
            {"id": first["id"], "rating": 1.0},
            {"id": first["id"]},
            {"id": first["id"], "rating": 1, "better_than": other["id"]},
            {"id": first["id"], "better_than": first["id"]},
            {"id": first["id"], "rating": 1, "extra": "field"},
            {"id": first["id"], "rating": 1, "comment": "x" * 2001},
            {"id": 5, "rating": 1},
            {"rating": 1},
            [first["id"], 1],
        ):
            response = http.post("/v1/feedback", json=bad)
            assert response.status_code == 400 and "error" in response.json(), (bad, response.text)
        assert (
            http.post("/v1/feedback", content=b"{not json", headers={"Content-Type": "application/json"}).status_code
            == 400
        )
        big = {"id": first["id"], "rating": 1, "comment": "x" * 17_000}
        assert "16384 bytes" in _error(http.post("/v1/feedback", json=big), 413)
        _error(anonymous.post("/v1/feedback", json={"id": first["id"], "rating": 1}), 401, code="invalid_api_key")
    stored = feedback_lines(srv)[before:]
    assert [{k: v for k, v in line.items() if k != "time"} for line in stored] == [
        {"id": first["id"], "rating": 1, "comment": "good <b>one</b>"},
        {"id": other["id"], "better_than": first["id"]},
        {"id": first["id"], "rating": -1},
    ]


def test_a_restarted_server_appends_and_knows_the_old_replies(srv, model_dir):
    """A second server on the same folder (after the first stopped) keeps the old lines, takes feedback on an old
    reply, and drops a last line a killed server cut off."""
    old = chat(srv, "a", "Remember me.")
    with open(srv.log_dir / "requests.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "chatcmpl-cut", "mod')  # a write cut off by a kill
    before = (srv.log_dir / "requests.jsonl").read_text(encoding="utf-8")
    again = InProcess(model_dir, 2_000_000, [f"a={model_dir}"], log_dir=srv.log_dir)
    try:
        assert (srv.log_dir / "requests.jsonl").read_text(encoding="utf-8") == before[: before.rindex("\n") + 1]
        assert any("cut off" in line for line in again.lines)
        with again.http() as http:
            assert http.post("/v1/feedback", json={"id": old["id"], "rating": 1}).status_code == 200
        new = chat(again, "a", "New one.")
        assert {old["id"], new["id"]} <= set(logged(srv))
    finally:
        again.stop()


def families(http) -> dict[str, dict]:
    """/metrics parsed by prometheus_client: {sample name: {labels as a sorted tuple: value}}."""
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_metrics_count_what_was_sent(srv):
    with srv.http() as http:
        before = families(http)
        replies = [chat(srv, "a", "One."), chat(srv, "a", "Two.", stream=True), chat(srv, "b", "Three.")]
        http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        http.post("/v1/chat/completions", json={"model": "a", "messages": []})
        after = families(http)
    requests = "ftune_requests_total"

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(requests, endpoint="chat", model="a", status="200") == 2
    assert delta(requests, endpoint="chat", model="b", status="200") == 1
    # an unknown model name is not a label (clients cannot grow the label set); a bad body on `a` is a's 400
    assert delta(requests, endpoint="chat", model="", status="404") == 1
    assert delta(requests, endpoint="chat", model="a", status="400") == 1
    assert not any(dict(labels).get("model") == "nope" for labels in after[requests])
    for model, mine in (("a", replies[:2]), ("b", replies[2:])):
        assert delta("ftune_generated_tokens_total", model=model) == sum(r["usage"]["completion_tokens"] for r in mine)
        assert delta("ftune_prompt_tokens_total", model=model) == sum(r["usage"]["prompt_tokens"] for r in mine)
        count = delta("ftune_request_duration_seconds_count", endpoint="chat", model=model)
        assert count == len(mine) + (model == "a")  # a's 400 took time too
        assert delta("ftune_time_to_first_token_seconds_count", model=model) == sum(1 for r in mine if r["text"])
    assert value(after, "ftune_queue_depth") == 0 and value(after, "ftune_running_batch_size") == 0
    assert value(after, "ftune_max_batch") == 8
    with srv.http(key=None) as anonymous:
        _error(anonymous.get("/metrics"), 401, code="invalid_api_key")


def test_origins(srv):
    """A browser page of another site cannot POST (403) unless --cors-origin names it; programs send no Origin;
    the server's own page (same host) can."""
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with srv.http() as http:
        host = srv.url.split("//")[1]
        assert http.post("/v1/chat/completions", json=body, headers={"Origin": srv.url}).status_code == 200
        refused = http.post("/v1/chat/completions", json=body, headers={"Origin": "https://evil.test"})
        assert "--cors-origin https://evil.test" in _error(refused, 403, code="origin_not_allowed")
        assert http.post("/v1/chat/completions", json=body, headers={"Origin": "null"}).status_code == 403
        allowed = http.post("/v1/chat/completions", json=body, headers={"Origin": "https://ok.test"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://ok.test"
        preflight = http.options(
            "/v1/feedback",
            headers={
                "Origin": "https://ok.test",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://ok.test"
        denied = http.options(
            "/v1/feedback", headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in denied.headers
        assert host in srv.url


def test_the_page_and_its_files_need_no_key_and_carry_a_strict_policy(srv, model_dir):
    with httpx.Client(base_url=srv.url, trust_env=False) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy and "'unsafe-inline'" not in policy
        for name in ("chat.js", "chat.css"):
            assert anonymous.get(f"/static/{name}").status_code == 200
        for bad in ("/static/..%2Fapp.py", "/static/../app.py", "/static/missing.js", "/static/"):
            assert anonymous.get(bad).status_code == 404, bad
        health = anonymous.get("/health").json()
        assert health["api_key"] is True and health["feedback"] is True and health["models"] == ["a", "b"]
    plain = InProcess(model_dir, 2_000_000, [f"c={model_dir}"], key=None)
    try:
        with httpx.Client(base_url=plain.url, trust_env=False) as anonymous:
            assert anonymous.get("/health").json() | {"running": 0, "waiting": 0} == {
                "status": "ok",
                "models": ["c"],
                "running": 0,
                "waiting": 0,
                "api_key": False,
                "feedback": False,
            }
            body = {"id": "chatcmpl-x", "rating": 1}
            assert "--log-requests" in _error(anonymous.post("/v1/feedback", json=body), 404, code="no_feedback")
            assert anonymous.get("/metrics").status_code == 200
    finally:
        plain.stop()


def test_log_folder_and_origin_flags_fail_before_loading(tmp_path, model_dir, monkeypatch):
    """A log folder holding someone's files, one in use by another server, or a malformed --cors-origin: exit 2 with
    one line, before any weights load, and the folder left as it was."""
    from typer.testing import CliRunner

    from finetune_cli import models, rundir
    from finetune_cli.cli import app

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    mine = tmp_path / "log"
    mine.mkdir()
    rundir.mark(mine, "serve-log", [])
    run = tmp_path / "run"
    run.mkdir()
    rundir.mark(run, "run", [])
    cases = [
        (["--log-requests", str(theirs)], "files ftune did not write"),
        (["--log-requests", str(run)], "a run output of ftune"),
        (["--log-requests", str(theirs / "notes.txt")], "is a file"),
        (["--cors-origin", "evil.test/path"], "--cors-origin evil.test/path"),
    ]
    for flags, expected in cases:
        result = CliRunner().invoke(app, ["serve", str(model_dir), "--port", "0", *flags])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], (flags, result.output)
    assert (theirs / "notes.txt").read_text() == "mine" and sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    with rundir.lock(mine, "--log-requests"):
        result = CliRunner().invoke(app, ["serve", str(model_dir), "--port", "0", "--log-requests", str(mine)])
        assert result.exit_code == 2 and "in use by another" in result.output, result.output


def test_models_take_turns(srv):
    """A short request for `b` is answered while a long stream of `a` is still decoding (the models take turns a
    step each; before, `b` waited for `a`'s batch to end): the chat page's side by side answers together."""
    import threading

    done = threading.Event()
    started = threading.Event()

    def long_stream():
        body = {"model": "a", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400}
        with srv.http() as http, http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    started.set()
        done.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(60)
    short = chat(srv, "b", "Hi.", max_tokens=2)
    finished_first = not done.is_set()
    thread.join(120)
    assert short["usage"]["completion_tokens"] <= 2 and finished_first
