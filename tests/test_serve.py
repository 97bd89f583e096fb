"""`ftune serve`: the real server started as a process on 127.0.0.1 (a free port), used through the official `openai`
client and plain HTTP (httpx). Answers are checked against `ftune generate` and `model.generate` run here."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx  # httpx and openai: test dependencies (pyproject's dev extra)
import openai
import pytest

from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-0123456789"
BASE = "smollm2-135m-instruct"
SYSTEM = "Extract the order as one line of JSON with keys name, item, quantity, color, city, deliver_by."
ORDER = "Hi, this is Omar Khan. I'd like 4 green lamps delivered to Oslo by Sunday, please."


class Server:
    """`python -m finetune_cli serve ARGS --port 0` until stopped; its URL comes from the ready line on stderr."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log, self.url = log, None
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.stderr = open(log, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "finetune_cli", "serve", *args, "--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.stderr, env=env, cwd=ROOT)

    def ready(self, timeout: float = 300) -> "Server":
        deadline = time.time() + timeout
        while self.url is None:
            found = re.search(r"ready at (http://127\.0\.0\.1:\d+)/v1", self.text())
            if found:
                self.url = found.group(1)
            elif self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{self.text()}")
            else:
                time.sleep(0.2)
        return self

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8")

    def client(self, key: str = KEY):
        return openai.OpenAI(
            base_url=self.url + "/v1",
            api_key=key,
            max_retries=0,
            http_client=httpx.Client(trust_env=False, timeout=120),
        )

    def http(self, key: str | None = KEY):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, trust_env=False, timeout=120)

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def run_dir(quickstart_run) -> Path:
    return quickstart_run[0]  # the shipped quickstart recipe, trained once per session: a LoRA that answers in JSON


TINY_KEY = "sk-flag-key"
TINY_LIMIT = 100_000  # its --max-request-bytes


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """A second server (the tiny model) for the flag and Ctrl-C tests, started alongside the main one to overlap
    start-ups: `--api-key` given as a flag (FTUNE_API_KEY set to another key, which the flag overrides) and
    `--max-request-bytes`."""
    args = [str(tiny_model_dir), "--api-key", TINY_KEY, "--max-request-bytes", str(TINY_LIMIT)]
    srv = Server(args, tmp_path_factory.mktemp("serve-tiny") / "server.log", {"FTUNE_API_KEY": KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(run_dir, tiny_server, tmp_path_factory):
    """The quickstart run as `tuned` (its base served too), the key from FTUNE_API_KEY, room for 8 + 2 requests,
    each finished request logged to `srv.log_dir`."""
    folder = tmp_path_factory.mktemp("serve")
    args = [f"tuned={run_dir}", "--max-batch", "8", "--max-queue", "2", "--log-requests", str(folder / "requests")]
    srv = Server(args, folder / "server.log", {"FTUNE_API_KEY": KEY}).ready()
    srv.log_dir = folder / "requests"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def models(run_dir):
    """The tuned and the base model as `ftune generate` loads them, in this process, for the expected answers."""
    from finetune_cli import rundir

    return {"tuned": rundir.load(str(run_dir)), BASE: rundir.load(BASE)}


def expected(models, name: str, messages: list[dict], max_tokens: int) -> dict:
    """What a greedy chat reply must be: `model.generate` as `ftune generate` calls it (text, token counts, finish)."""
    from finetune_cli.data.masking import end_of_turn_ids, render

    model, tok = models[name]
    enc = tok(render(tok, messages, add_generation_prompt=True), add_special_tokens=False, return_tensors="pt")
    stops = end_of_turn_ids(tok)
    out = model.generate(
        **enc, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
        pad_token_id=tok.pad_token_id, eos_token_id=stops,
    )  # fmt: skip
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    return {
        "text": tok.decode(new, skip_special_tokens=True).strip(),
        "prompt_tokens": enc["input_ids"].shape[1],
        "completion_tokens": len(new),
        "finish": "stop" if new[-1] in stops else "length",
    }


def chat(messages_or_text, system: str | None = None) -> list[dict]:
    if isinstance(messages_or_text, list):
        return messages_or_text
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": messages_or_text}]


@pytest.mark.slow
def test_models_are_the_run_and_its_base(server):
    ids = {m.id for m in server.client().models.list()}
    assert ids == {"tuned", BASE}
    assert "ready at http://127.0.0.1:" in server.text() and "tuned, smollm2-135m-instruct" in server.text()


@pytest.mark.slow
def test_chat_equals_ftune_generate(server, run_dir, models):
    """The tuned model's greedy answer is `ftune generate`'s, word for word; usage and finish_reason are right."""
    from typer.testing import CliRunner

    from finetune_cli.cli import app

    cli = CliRunner().invoke(
        app, ["generate", str(run_dir), "--system", SYSTEM, "--prompt", ORDER, "--max-new-tokens", "64"]
    )
    assert cli.exit_code == 0, cli.output
    r = server.client().chat.completions.create(model="tuned", messages=chat(ORDER, SYSTEM), max_tokens=64)
    assert r.choices[0].message.content == cli.stdout.strip()
    answer = json.loads(r.choices[0].message.content)  # the adapter learned to answer with JSON
    assert answer["city"] == "Oslo" and answer["quantity"] == 4
    want = expected(models, "tuned", chat(ORDER, SYSTEM), 64)
    assert r.choices[0].finish_reason == want["finish"] == "stop"
    assert r.usage.prompt_tokens == want["prompt_tokens"]
    assert r.usage.completion_tokens == want["completion_tokens"]
    assert r.usage.total_tokens == want["prompt_tokens"] + want["completion_tokens"]
    assert r.object == "chat.completion" and r.model == "tuned" and r.choices[0].message.role == "assistant"


@pytest.mark.slow
def test_base_is_served_without_the_adapter(server, models):
    """The same request to the base name gets the base model's answer, not the adapter's."""
    client = server.client()
    r = client.chat.completions.create(model=BASE, messages=chat(ORDER, SYSTEM), max_tokens=24)
    want = expected(models, BASE, chat(ORDER, SYSTEM), 24)
    assert r.choices[0].message.content == want["text"]
    assert r.choices[0].finish_reason == want["finish"]
    tuned = client.chat.completions.create(model="tuned", messages=chat(ORDER, SYSTEM), max_tokens=24)
    assert tuned.choices[0].message.content.startswith('{"name": "Omar Khan"')
    assert r.choices[0].message.content != tuned.choices[0].message.content


@pytest.mark.slow
def test_chat_stream_adds_up_to_the_reply(server, models):
    """Streamed deltas join to the greedy reply; the role comes first, then finish_reason, then usage when asked."""
    chunks = list(
        server.client().chat.completions.create(
            model=BASE, messages=chat("Say hi."), max_tokens=40, stream=True, stream_options={"include_usage": True}
        )
    )
    want = expected(models, BASE, chat("Say hi."), 40)
    assert want["finish"] == "stop"  # the model ends its turn before 40 tokens: the end-of-turn token stops it
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == want["completion_tokens"]
    assert chunks[-1].usage.prompt_tokens == want["prompt_tokens"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed, not in one piece


@pytest.mark.slow
def test_completions_raw_prompt(server, models):
    """/v1/completions continues the raw text (no chat template), streamed or not, as `model.generate` does."""
    model, tok = models[BASE]
    prompt = "The capital of France is"
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, temperature=None, top_p=None, top_k=None)
    want = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    client = server.client()
    r = client.completions.create(model=BASE, prompt=prompt, max_tokens=8)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (enc["input_ids"].shape[1], 8)
    streamed = list(client.completions.create(model=BASE, prompt=prompt, max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "length"


@pytest.mark.slow
def test_stop_texts_and_sampling(server, models):
    """`stop` cuts the reply before the stop text (finish_reason stop); a seed repeats a sampled reply."""
    client = server.client()
    greedy = expected(models, BASE, chat("Say hi."), 40)["text"]
    assert "!" in greedy
    r = client.chat.completions.create(model=BASE, messages=chat("Say hi."), max_tokens=40, stop=["!"])
    assert r.choices[0].message.content == greedy.split("!")[0].strip()
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=BASE, messages=chat("Say hi."), max_tokens=40, stop="!", stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == greedy.split("!")[0].strip()
    sampled = [
        client.chat.completions.create(
            model=BASE, messages=chat("Name a fruit."), max_tokens=10, temperature=1.5, seed=7
        )
        for _ in range(2)
    ]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content
    zero = client.chat.completions.create(model=BASE, messages=chat("Name a fruit."), max_tokens=10, temperature=0)
    assert zero.choices[0].message.content == expected(models, BASE, chat("Name a fruit."), 10)["text"]
    assert sampled[0].choices[0].message.content != zero.choices[0].message.content  # it did sample


def _error(response, status: int, param=None, code=None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param and body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body["error"]["message"]


@pytest.mark.slow
def test_errors_in_openai_shape(server):
    """401 without or with a wrong key, 404 for an unknown model, 400 for a bad body (never FastAPI's 422)."""
    ok = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with server.http(key=None) as anonymous, server.http(key="sk-wrong") as wrong, server.http() as http:
        assert anonymous.get("/health").json()["status"] == "ok"  # health checks need no key
        _error(anonymous.post("/v1/chat/completions", json=ok), 401, code="invalid_api_key")
        _error(wrong.get("/v1/models"), 401, code="invalid_api_key")
        assert "not served" in _error(
            http.post("/v1/chat/completions", json={**ok, "model": "gpt-4"}), 404, "model", "model_not_found"
        )
        bad = {
            "messages": ({**ok, "messages": []}, "messages", None),
            "messages[0].content": ({**ok, "messages": [{"role": "user"}]}, "messages[0].content", None),
            "max_tokens": ({**ok, "max_tokens": -5}, "max_tokens", None),
            "n": ({**ok, "n": 2}, "n", None),
            "temperature": ({**ok, "temperature": "hot"}, "temperature", None),
            "role": ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", None),
            "missing": ({"model": BASE}, "messages", None),
            "too long": ({**ok, "messages": chat("hello " * 9000)}, "messages", "context_length_exceeded"),
            "room": ({**ok, "max_tokens": 8190}, "max_tokens", "context_length_exceeded"),
        }  # fmt: skip
        for what, (body, param, code) in bad.items():
            message = _error(http.post("/v1/chat/completions", json=body), 400, param, code)
            assert message, what
        assert "n=1" in _error(http.post("/v1/chat/completions", json={**ok, "n": 2}), 400, "n")
        not_json = http.post("/v1/chat/completions", content=b"{x", headers={"Content-Type": "application/json"})
        assert "JSON" in _error(not_json, 400)
        _error(http.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 0}), 400, "max_tokens")
        _error(http.get("/v1/nothing"), 404)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="sk-wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=chat("hi"))
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=BASE, messages=chat("hi"), n=3)
    assert KEY not in server.text() and "sk-wrong" not in server.text()  # the key is never logged
    assert re.search(r"POST /v1/chat/completions 401 .*ms=\d+", server.text())  # one line per request, errors too


def _wait_idle(server, timeout: float = 10) -> dict:
    with server.http() as http:
        deadline = time.time() + timeout
        while True:
            health = http.get("/health").json()
            if health["running"] == health["waiting"] == 0 or time.time() > deadline:
                return health
            time.sleep(0.1)


@pytest.mark.slow
def test_queue_full_is_503_and_a_dropped_stream_frees_its_slot(server):
    """8 decoding + 2 waiting fill the server: the next request gets 503 at once; clients that go away (mid-stream,
    or waiting for a whole answer) cancel their generations, the slots free up and the server keeps serving."""
    body = {"model": BASE, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400}
    with server.http() as http:
        streams = []
        try:
            for _ in range(10):
                s = http.stream("POST", "/v1/chat/completions", json={**body, "stream": True})
                response = s.__enter__()
                streams.append(s)
                assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            message = _error(http.post("/v1/chat/completions", json=body), 503, code="queue_full")
            assert "busy" in message
        finally:
            for s in streams:
                s.__exit__(None, None, None)  # the clients go away mid-stream
    health = _wait_idle(server)
    assert health["running"] == health["waiting"] == 0
    cancelled = [int(n) for n in re.findall(r"completion_tokens=(\d+) finish=cancelled", server.text())]
    assert len(cancelled) >= 10 and all(n < 400 for n in cancelled)
    with server.http() as http, pytest.raises(httpx.ReadTimeout):  # a client that stops waiting for its answer
        http.post("/v1/chat/completions", json=body, timeout=1.5)
    assert _wait_idle(server)["running"] == 0
    assert re.search(r" 499 .*completion_tokens=\d+ finish=cancelled", server.text())
    r = server.client().chat.completions.create(model=BASE, messages=chat("Say hi."), max_tokens=3)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_concurrent_clients_each_get_their_own_answer(server, models):
    """8 clients at once: each answer is the one it gets alone (greedy), and they were decoded together."""
    questions = [
        ("tuned", "Order for Raj Ruiz: 10 x scarf (orange), deliver to Lisbon, deadline Friday."),
        (BASE, "What is 2+2?"),
        ("tuned", "Hi, Ana Lee here. 2 red mugs to Porto by Monday."),
        (BASE, "Name a color."),
        (BASE, "What is the capital of France?"),
        ("tuned", ORDER),
        (BASE, "Count to five."),
        (BASE, "Who are you?"),
    ]
    client = server.client()

    def ask(item):
        name, question = item
        messages = chat(question, SYSTEM if name == "tuned" else None)
        return client.chat.completions.create(model=name, messages=messages, max_tokens=10).choices[0].message.content

    before = len(server.text().splitlines())
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, questions))
    for (name, question), answer in zip(questions, answers):
        assert answer == expected(models, name, chat(question, SYSTEM if name == "tuned" else None), 10)["text"]
    batches = [int(b) for b in re.findall(r"batch=(\d+)", "\n".join(server.text().splitlines()[before:]))]
    assert len(batches) == 8 and max(batches) >= 2  # requests of one model decoded together


@pytest.mark.slow
def test_sse_framing_over_plain_http(server):
    """What curl sees: text/event-stream, `data: {json}` events separated by blank lines, `data: [DONE]` last."""
    body = {"model": BASE, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(p["object"] == "chat.completion.chunk" and p["id"] == payloads[0]["id"] for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_feedback_loop_from_the_real_server(server, tmp_path):
    """serve -> ratings -> `ftune feedback` -> data `ftune validate` accepts for KTO and DPO: the replies the real
    server logged, rated through its API, come out as the training rows (prompt = the conversation sent)."""
    from typer.testing import CliRunner

    from finetune_cli.cli import app

    client = server.client()
    asked = chat(ORDER, SYSTEM)
    tuned = client.chat.completions.create(model="tuned", messages=asked, max_tokens=64)
    base = client.chat.completions.create(model=BASE, messages=asked, max_tokens=64)
    other = client.chat.completions.create(model="tuned", messages=chat("Order for Li Wu: 1 x pen (black), deliver to "
                                           "Rome, deadline Tuesday.", SYSTEM), max_tokens=64)  # fmt: skip
    assert tuned.choices[0].finish_reason == "stop" == other.choices[0].finish_reason
    with server.http() as http:
        for body in ({"id": tuned.id, "rating": 1}, {"id": other.id, "rating": -1}, {"id": tuned.id,
                     "better_than": base.id}):  # fmt: skip
            assert http.post("/v1/feedback", json=body).status_code == 200
    kto, dpo = tmp_path / "kto.jsonl", tmp_path / "dpo.jsonl"
    for out, fmt in ((kto, "kto"), (dpo, "dpo")):
        result = CliRunner().invoke(app, ["feedback", str(server.log_dir), "-o", str(out), "--format", fmt])
        assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in map(json.loads, kto.read_text().splitlines())}
    assert rows[tuned.id]["prompt"] == asked and rows[tuned.id]["label"] is True
    assert rows[tuned.id]["completion"] == [{"role": "assistant", "content": tuned.choices[0].message.content}]
    assert rows[other.id]["label"] is False
    pairs = [json.loads(line) for line in dpo.read_text().splitlines()]
    assert any(
        p["prompt"] == asked
        and p["chosen"][0]["content"] == tuned.choices[0].message.content
        and p["rejected"][0]["content"] == base.choices[0].message.content
        for p in pairs
    )
    for out, objective in ((kto, "kto"), (dpo, "dpo")):
        recipe = tmp_path / f"{objective}.yaml"
        recipe.write_text(
            f"model: {{base: {BASE}}}\ndata: {{train: {out}, max_length: 256}}\nmethod: {{name: lora}}\n"
            f"training: {{objective: {objective}, max_steps: 1}}\noutput: {{dir: {tmp_path / objective}}}\n"
        )
        result = CliRunner().invoke(app, ["validate", str(recipe), "--json"])
        assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_sigterm_ends_in_flight_requests(server):
    """SIGTERM: the streaming request gets an error event, the server exits 0 within seconds. (Runs last of the
    tests that use the module's server: it stops it.)"""
    body = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 1000, "stream": True}
    events = []
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        events.append(next(lines))
        start = time.time()
        server.proc.send_signal(signal.SIGTERM)
        events += list(lines)
    assert server.stop() == 0 and time.time() - start < 10
    assert any("shutting down" in e for e in events) and "data: [DONE]" not in events
    assert "serve: stopped" in server.text()


@pytest.mark.slow
def test_api_key_flag_and_request_size_limit(tiny_server, tiny_model_dir):
    """`--api-key KEY` is the key (over $FTUNE_API_KEY); `--max-request-bytes N`: a larger body is a 413 in OpenAI's
    shape, whether its Content-Length says so (refused unread) or a chunked body passes N as it comes."""
    srv = tiny_server.ready()
    assert srv.client(key=TINY_KEY).models.list().data[0].id == tiny_model_dir.name
    for wrong in (KEY, None):
        with srv.http(key=wrong) as http:
            _error(http.get("/v1/models"), 401, code="invalid_api_key")
    big = {"model": tiny_model_dir.name, "messages": chat("word " * (TINY_LIMIT // 5)), "max_tokens": 1}
    with srv.http(key=TINY_KEY) as http:
        assert "--max-request-bytes" in _error(http.post("/v1/chat/completions", json=big), 413)
        chunked = (json.dumps(big)[i : i + 4096].encode() for i in range(0, len(json.dumps(big)), 4096))
        headers = {"Content-Type": "application/json"}
        _error(http.post("/v1/chat/completions", content=chunked, headers=headers), 413)
        assert http.get("/health").json()["status"] == "ok"
    with pytest.raises(openai.APIStatusError) as raised:
        srv.client(key=TINY_KEY).chat.completions.create(**big)
    assert raised.value.status_code == 413
    small = {**big, "messages": chat("word " * (TINY_LIMIT // 10))}  # allowed, and too long for the context
    with pytest.raises(openai.BadRequestError) as raised:
        srv.client(key=TINY_KEY).chat.completions.create(**small)
    assert raised.value.code == "context_length_exceeded"


@pytest.mark.slow
def test_ctrl_c_exits_130(tiny_server, tiny_model_dir):
    srv = tiny_server.ready()
    with srv.http(key=TINY_KEY) as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == tiny_model_dir.name
    assert srv.stop(signal.SIGINT) == 130
    assert "serve: stopped" in srv.text()


# --- the tiny model served in this process (uvicorn in a thread), for tests that look inside or patch the server


class InProcess(Server):
    """`ftune serve`'s app over the tiny model in this process: `engine` and the request log are at hand."""

    def __init__(self, model_dir: Path, max_request_bytes: int, targets: list[str] | None = None, key=KEY, **options):
        """`targets` (default: the model folder) as `ftune serve` takes them; `options`: create_app's keywords
        (log_dir, cors_origins)."""
        import uvicorn

        from finetune_cli.serving import app as serve
        from finetune_cli.serving import engine, served, server

        self.lines = []
        self.engine = engine.Engine(served.load(targets or [str(model_dir)]), max_batch=8, max_queue=8)
        self.served = next(iter(self.engine.served.values()))
        app = serve.create_app(self.engine, key, self.lines.append, max_request_bytes, **options)
        sock = server.bind("127.0.0.1", 0)
        sock.listen(64)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "the in-process server did not start"
            time.sleep(0.05)

    def text(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def inproc(tmp_path_factory, tokenizer):
    """An untied tiny random model (a tied one repeats the prompt's last token, so its greedy replies are blank)."""
    srv = InProcess(tiny_model(tmp_path_factory.mktemp("tiny-untied"), tokenizer, tied=False), 2_000_000)
    yield srv
    srv.stop()


def tiny_expected(srv: InProcess, question: str, max_tokens: int, **sampling) -> str:
    """The chat reply `model.generate` gives (greedy, or sampled after `torch.manual_seed(seed)`)."""
    import torch

    from finetune_cli.data.masking import end_of_turn_ids, render

    model, tok = srv.served.model, srv.served.tokenizer
    enc = tok(render(tok, chat(question), add_generation_prompt=True), add_special_tokens=False, return_tensors="pt")
    if sampling:
        torch.manual_seed(sampling.pop("seed"))
        kwargs = {"do_sample": True, "top_k": None, "top_p": 1.0, **sampling}
    else:
        kwargs = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    out = model.generate(
        **enc, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id, eos_token_id=end_of_turn_ids(tok), **kwargs
    )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def hold_first_sample(monkeypatch, srv: InProcess, together: int, fail_seeds=()) -> threading.Event:
    """Patch the sampler: the first sampled token waits (the worker with it) until `together` requests are in, so
    they decode as one batch (the Event returned is set once they do); a request whose seed is in `fail_seeds`
    raises then, at its third token (a fault in one request, mid-generation)."""
    from finetune_cli.inference import batching

    real, met, engine = batching._sample, threading.Event(), srv.engine

    def sample(logits, seq):
        if not met.is_set():
            deadline = time.time() + 30
            while len(engine.waiting) + len(engine.running) < together and time.time() < deadline:
                time.sleep(0.01)
            if len(engine.running) == together:
                met.set()
        if seq.seed in fail_seeds and met.is_set() and len(seq.tokens) >= 2:
            raise RuntimeError("injected fault")
        return real(logits, seq)

    monkeypatch.setattr(batching, "_sample", sample)
    return met


def test_a_failing_request_ends_alone(inproc, monkeypatch):
    """A fault while decoding one request (a plain and a streamed one here) ends that request alone: 2 streamed and
    2 plain requests of other clients, decoding in the same batch, get the answers `model.generate` gives, and the
    server keeps serving."""
    questions = ["Say hi.", "Name a fruit.", "Count to three.", "What is 2+2?"]
    want = [tiny_expected(inproc, q, 30) for q in questions]
    name = inproc.served.name
    met = hold_first_sample(monkeypatch, inproc, together=6, fail_seeds=(13, 14))
    client = inproc.client()

    def ask(i):
        kwargs = {"model": name, "max_tokens": 30}
        if i >= 4:  # the faulty ones: sampled, seeds 13 (plain) and 14 (streamed)
            kwargs.update(messages=chat("Tell me a story."), max_tokens=100, temperature=1, seed=9 + i)
        else:
            kwargs.update(messages=chat(questions[i]), temperature=0)
        try:
            if i % 2:
                chunks = client.chat.completions.create(**kwargs, stream=True)
                return "".join(c.choices[0].delta.content or "" for c in chunks)
            return client.chat.completions.create(**kwargs).choices[0].message.content
        except openai.APIError as exc:
            return exc

    with ThreadPoolExecutor(6) as pool:
        faulty = [pool.submit(ask, i) for i in (4, 5)]  # first: their first sampled token holds the batch open
        while len(inproc.engine.running) + len(inproc.engine.waiting) < 2:
            time.sleep(0.01)
        others = list(pool.map(ask, range(4)))
        plain, streamed = (f.result() for f in faulty)
    assert met.is_set()  # the six decoded together
    assert others == want
    assert isinstance(plain, openai.InternalServerError) and plain.code == "generation_failed", plain
    assert "injected fault" in plain.message
    assert isinstance(streamed, openai.APIError) and "injected fault" in streamed.message, streamed
    assert _wait_idle(inproc)["running"] == 0
    monkeypatch.undo()
    r = client.chat.completions.create(model=name, messages=chat(questions[0]), max_tokens=30, temperature=0)
    assert r.choices[0].message.content == want[0]


def test_sampling_settings_matter_and_a_seed_repeats(inproc, monkeypatch):
    """A seeded sampled reply is `model.generate`'s (do_sample, after `torch.manual_seed(seed)`), alone and decoding
    in one batch beside other requests; seed, temperature and top_p each change it; temperature 0, and a top_p so
    small that only the likeliest token is left, give the greedy reply."""
    question, name, client = "Name a fruit.", inproc.served.name, inproc.client()
    settings = [
        {"seed": 7, "temperature": 1.0},
        {"seed": 8, "temperature": 1.0},
        {"seed": 7, "temperature": 0.5},
        {"seed": 7, "temperature": 1.0, "top_p": 0.5},
    ]
    want = [tiny_expected(inproc, question, 20, **s) for s in settings]
    greedy = tiny_expected(inproc, question, 20)
    assert len({*want, greedy}) == 5  # the random model's distribution is flat: every setting changes the reply

    def ask(sampling):
        r = client.chat.completions.create(model=name, messages=chat(question), max_tokens=20, **sampling)
        return r.choices[0].message.content

    assert [ask(s) for s in settings] == want
    assert ask({"temperature": 0, "seed": 7}) == ask({"temperature": 1.0, "top_p": 1e-9, "seed": 9}) == greedy
    before = len(inproc.lines)
    met = hold_first_sample(monkeypatch, inproc, together=5)
    with ThreadPoolExecutor(5) as pool:
        sampled = [pool.submit(ask, s) for s in settings]
        while len(inproc.engine.running) + len(inproc.engine.waiting) < 1:
            time.sleep(0.01)
        assert ask({"temperature": 0}) == greedy
        assert [f.result() for f in sampled] == want
    assert met.is_set() and re.findall(r"batch=(\d+)", "\n".join(inproc.lines[before:])) == ["5"] * 5


def test_out_of_range_seed_and_temperature(inproc):
    """OpenAI's `seed` is an int64 and `temperature` is in [0, 2]: other values are a 400 naming the field (a seed
    past int64 used to fail the whole running batch); a temperature below 1e-5 decodes greedily (it used to divide
    the logits into inf), the int64 edges sample as `torch.manual_seed` seeds."""
    name, client = inproc.served.name, inproc.client()

    def ask(**kwargs):
        r = client.chat.completions.create(model=name, messages=chat("Say hi."), max_tokens=10, **kwargs)
        return r.choices[0].message.content

    bad = [{"seed": 2**64}, {"seed": 2**63}, {"seed": -(2**63) - 1}, {"seed": 1e23}, {"seed": 1.5}]
    for body in bad + [{"temperature": 2.5}, {"temperature": -0.1}, {"temperature": 1e-45, "top_p": 0}]:
        with pytest.raises(openai.BadRequestError) as raised:
            ask(**{"temperature": 1.0, **body})
        assert raised.value.param in body, (body, raised.value.body)
    greedy = tiny_expected(inproc, "Say hi.", 10)
    for temperature in (1e-45, 5e-324, 1e-6):
        assert ask(temperature=temperature, seed=2**63 - 1) == greedy
    for seed in (2**63 - 1, -(2**63)):
        assert ask(temperature=1.0, seed=seed) == tiny_expected(inproc, "Say hi.", 10, seed=seed, temperature=1.0)
    assert _wait_idle(inproc)["running"] == 0


def test_a_long_prompt_is_tokenized_off_the_event_loop(inproc, monkeypatch):
    """While one prompt is being tokenized (held here on an Event: a 20 MB one takes seconds), /health answers and a
    running stream decodes to its end: neither the event loop nor the decoding worker waits for the tokenizer."""
    name, served = inproc.served.name, inproc.served
    entered, release, real = threading.Event(), threading.Event(), served.tokenizer

    class Held:
        def __getattr__(self, attr):
            return getattr(real, attr)

        def __call__(self, *args, **kwargs):
            entered.set()
            release.wait(60)
            return real(*args, **kwargs)

    body = {"model": name, "messages": chat("Tell me a story."), "max_tokens": 200, "temperature": 0, "stream": True}
    want = tiny_expected(inproc, "Tell me a story.", 200)
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(base_url=inproc.url, headers=headers, trust_env=False, timeout=10) as http,
        ThreadPoolExecutor(1) as pool,
        http.stream("POST", "/v1/chat/completions", json=body) as stream,
    ):
        lines = stream.iter_lines()
        first = next(lines)
        monkeypatch.setattr(served, "tokenizer", Held())
        try:
            held = pool.submit(inproc.client().completions.create, model=name, prompt="Once", max_tokens=3)
            assert entered.wait(30)
            assert http.get("/health").json()["status"] == "ok"
            events = [e for e in (first, *lines) if e]  # the whole stream, while the other prompt is tokenized
            assert not held.done()
        finally:
            release.set()
        assert held.result().choices[0].finish_reason == "length"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
    assert events[-1] == "data: [DONE]" and payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads) == want


@pytest.mark.parametrize("flags", [["--seed", str(2**64)], ["--seed", str(-(2**63) - 1)], ["--temperature", "1e-45"]])
def test_generate_checks_seed_and_temperature_as_serve_does(tiny_model_dir, monkeypatch, flags):
    """`ftune generate --do-sample` with a seed past int64 or a temperature below 1e-5 is exit 2 naming the flag,
    before the model loads (it was an exit 1 from torch after loading)."""
    from typer.testing import CliRunner

    from finetune_cli import models
    from finetune_cli.cli import app

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the flags' check"))
    result = CliRunner().invoke(app, ["generate", str(tiny_model_dir), "-p", "hi", "--do-sample", *flags])
    assert result.exit_code == 2 and result.output.startswith(f"error: {flags[0]}"), result.output


def test_bad_target_fails_before_listening(tmp_path):
    """A TARGET that is not there: exit 2 and one error line, no port opened."""
    from typer.testing import CliRunner

    from finetune_cli.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing-run"), "--port", "0"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing-run" in lines[0]
    result = CliRunner().invoke(app, ["serve", f"a={tmp_path}", f"a={tmp_path}"])
    assert result.exit_code == 2 and "two targets are named 'a'" in result.output


def greedy_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """The prompts through serve's decoder, `batch_size` at a time, each joining as soon as there is room."""
    from finetune_cli.data.masking import end_of_turn_ids
    from finetune_cli.inference import batching

    stops, penalty = frozenset(end_of_turn_ids(tokenizer)), batching.repetition_penalty(model)
    seqs = [batching.Sequence(list(p), max_new_tokens, stops, repetition_penalty=penalty) for p in prompts]
    batch, pending = batching.Batch(model, tokenizer.pad_token_id), list(seqs)
    while pending or len(batch):
        room = batch_size - len(batch)
        if pending and room > 0 and batch.can_join():
            batch.add(pending[:room])
            pending = pending[room:]
        else:
            batch.step()
    return [s.tokens for s in seqs]


def test_batched_greedy_equals_one_by_one(tiny_model_dir):
    """Serve's decoder (left-padded, sequences joining as others end) gives each prompt `model.generate`'s
    tokens, also with a repetition penalty from the generation config; tiny random model, so replies run long."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_cli.data.masking import end_of_turn_ids
    from finetune_cli.inference import batching

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [tok(f"Question {i}: " + "why " * (i * 3))["input_ids"] for i in range(7)]
    for penalty in (1.0, 1.5):
        model.generation_config.repetition_penalty = penalty
        one_by_one = []
        for p in prompts:
            out = model.generate(
                torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                eos_token_id=end_of_turn_ids(tok),
            )  # fmt: skip
            one_by_one.append(out[0, len(p) :].tolist())
        assert greedy_batch(model, tok, prompts, 12, batch_size=3) == one_by_one
        assert greedy_batch(model, tok, prompts, 12, batch_size=8) == one_by_one
    assert batching.unsupported(model) == []
    model.generation_config.no_repeat_ngram_size = 3
    assert batching.unsupported(model) == ["no_repeat_ngram_size"]


@pytest.mark.parametrize(
    "text, stops, strip, final",
    [
        ("Héllo wörld, 日本語です! Done. ", ["!"], True, "Héllo wörld, 日本語です"),
        ("Hello there! I am fine.", ["am f"], True, "Hello there! I"),
        (" Hi  , there . ", [], True, "Hi  , there ."),
        (" Hi  , there . ", [], False, " Hi  , there . "),
        ('{"a": 1}\n\nEND more', ["END", "\n\nE"], False, '{"a": 1}'),
    ],
)
def test_streamed_text_adds_up_to_the_reply(tokenizer, text, stops, strip, final):
    """What streams token by token joins to the final reply: cut before a stop text, stripped for chat, and never
    a piece that a later token takes back (half a UTF-8 character, a space before punctuation)."""
    from finetune_cli.serving.engine import Text

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    reply, pieces, stopped = Text(tokenizer, stops, strip), [], False
    for i in range(1, len(ids) + 1):
        piece, stopped = reply.feed(ids[:i])
        pieces.append(piece)
        if stopped:
            break
    assert stopped == bool(stops)
    assert reply.final() == final and "".join(pieces) + reply.rest() == final
    assert "\ufffd" not in "".join(pieces) and sum(map(bool, pieces)) > 2  # streamed in pieces
