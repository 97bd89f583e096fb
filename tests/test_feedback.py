"""`ftune feedback DIR -o FILE`: a hand-written `ftune serve --log-requests` folder becomes exactly the KTO rows and
DPO pairs worked out here by hand (replacements, skips and counts), which ftune's own loader, `ftune validate`,
`ftune preview` (against the model's chat template) and a short training run read; every bad input is exit 2 with
one line and nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli import rundir
from finetune_cli.cli import app
from finetune_cli.data.feedback import describe

runner = CliRunner()
SYSTEM = {"role": "system", "content": "Answer briefly."}
SUM = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
JOKE = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Tell me a joke."},
]
COLOR = [{"role": "user", "content": "Name a colour."}]


def request(n: int, messages, reply: str, finish: str = "stop", model: str = "tuned", **extra) -> dict:
    """One requests.jsonl line as the contract writes it."""
    return {
        "id": f"chatcmpl-{n}",
        "time": f"2026-12-03T15:30:{n:02d}.000Z",
        "model": model,
        "endpoint": "chat",
        "messages": messages,
        "reply": reply,
        "finish_reason": finish,
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "latency_s": 0.5,
        "time_to_first_token_s": 0.1,
        "settings": {"temperature": None, "top_p": None, "max_tokens": 64, "seed": None, "stop": []},
        **extra,
    }


REQUESTS = [
    request(1, SUM, "Four."),  # rated up, then down: down stands
    request(2, SUM, "It is four.", model="base"),  # rated up: the pair (2 over 1) from ratings
    request(3, [{"role": "user", "content": "Capital of France?"}], "The capital of", finish="length"),  # cut
    {**request(4, None, "a time."), "endpoint": "completions", "prompt": "Once upon"},  # not chat
    request(5, JOKE, "Why did the chicken cross the road?"),  # multi-turn, rated up, no opposite rating
    request(6, [*COLOR, {"role": "assistant", "content": "Red"}], "dish."),  # a prefill: not a user turn last
    request(7, COLOR, "Blue."),  # side by side with 8: 8 chosen first, then 7 (7 stands)
    request(8, COLOR, "Colour: blue", model="base"),
    request(9, COLOR, "Green."),  # never rated
    request(10, SUM, "Four."),  # rated down: the same text as 1, so the same DPO pair, a second KTO row
]
for r in REQUESTS:
    if r["endpoint"] == "completions":
        del r["messages"]
FEEDBACK = [
    {"id": "chatcmpl-5", "rating": 1},  # rated first, written in the order of the requests
    {"id": "chatcmpl-1", "rating": 1},
    {"id": "chatcmpl-2", "rating": 1, "comment": "clear"},
    {"id": "chatcmpl-3", "rating": 1},
    {"id": "chatcmpl-4", "rating": -1},
    {"id": "chatcmpl-8", "better_than": "chatcmpl-7"},
    {"id": "chatcmpl-1", "rating": -1},
    {"id": "chatcmpl-6", "rating": 1},
    {"id": "chatcmpl-gone", "rating": 1},  # not in requests.jsonl
    {"id": "chatcmpl-7", "better_than": "chatcmpl-8"},  # replaces 8 over 7
    {"id": "chatcmpl-1", "better_than": "chatcmpl-5"},  # replies to different messages: no pair
    {"id": "chatcmpl-10", "rating": -1},
]


def lines(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def make_log(folder: Path, requests=REQUESTS, feedback=FEEDBACK, torn: bool = True) -> Path:
    """A serve-log folder; with `torn`, each file ends in half a line (a server killed mid-write)."""
    folder.mkdir(parents=True, exist_ok=True)
    rundir.mark(folder, "serve-log", ["requests.jsonl", "feedback.jsonl"])
    cut = '{"id": "chatcmpl-11", "time": "2026-12' if torn else ""
    (folder / "requests.jsonl").write_text(lines(requests) + cut, encoding="utf-8")
    if feedback is not None:
        (folder / "feedback.jsonl").write_text(lines(feedback) + ('{"id": "chatcmpl-9", "rat' * torn), "utf-8")
    return folder


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


KTO = [
    {"prompt": SUM, "completion": reply("Four."), "label": False, "id": "chatcmpl-1", "model": "tuned"},
    {"prompt": SUM, "completion": reply("It is four."), "label": True, "id": "chatcmpl-2", "model": "base",
     "comment": "clear"},
    {"prompt": JOKE, "completion": reply("Why did the chicken cross the road?"), "label": True, "id": "chatcmpl-5",
     "model": "tuned"},
    {"prompt": SUM, "completion": reply("Four."), "label": False, "id": "chatcmpl-10", "model": "tuned"},
]  # fmt: skip
DPO = [
    {"prompt": SUM, "chosen": reply("It is four."), "rejected": reply("Four."), "id": ["chatcmpl-2", "chatcmpl-1"],
     "model": ["base", "tuned"], "from": "rating"},
    {"prompt": COLOR, "chosen": reply("Blue."), "rejected": reply("Colour: blue"), "id": ["chatcmpl-7", "chatcmpl-8"],
     "model": ["tuned", "base"], "from": "choice"},
]  # fmt: skip
SKIPPED = {
    "cut at max_tokens": 1,
    "completions API": 1,
    "conversation not ending with a user message": 1,
    "id not in requests.jsonl": 1,
    "incomplete last line of requests.jsonl": 1,
    "incomplete last line of feedback.jsonl": 1,
}


def export(log: Path, out: Path, fmt: str):
    result = runner.invoke(app, ["feedback", str(log), "-o", str(out), "--format", fmt, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feedback")
    log = make_log(folder / "log")
    kto, dpo = export(log, folder / "kto.jsonl", "kto"), export(log, folder / "dpo.jsonl", "dpo")
    return folder, kto, dpo


def test_kto_rows_are_the_standing_ratings_of_finished_chat_replies(exported):
    folder, (summary, rows), _ = exported
    assert rows == KTO
    assert summary["skipped"] == {**SKIPPED, "side-by-side choices: they make DPO pairs": 2}
    assert (summary["requests"], summary["ratings"], summary["choices"], summary["feedback_lines"]) == (10, 8, 2, 12)
    assert (summary["rows"], summary["desirable"], summary["undesirable"], summary["replaced"]) == (4, 2, 2, 2)
    result = runner.invoke(app, ["feedback", str(folder / "log"), "-o", str(folder / "k2.jsonl")])
    assert result.exit_code == 0 and result.stdout == ""
    first, hint = result.stderr.splitlines()
    assert first.startswith(f"wrote 4 KTO rows (2 desirable, 2 undesirable) to {folder / 'k2.jsonl'} from 10 logged")
    assert "1 (cut at max_tokens)" in first and "2 (side-by-side choices: they make DPO pairs)" in first
    assert "training.objective: kto" in hint and f"data.train: {folder / 'k2.jsonl'}" in hint
    assert (folder / "k2.jsonl").read_text() == (folder / "kto.jsonl").read_text()  # the same every time


def test_dpo_pairs_from_choices_and_opposite_ratings(exported):
    _, _, (summary, rows) = exported
    assert rows == DPO
    assert summary["skipped"] == {
        **SKIPPED,
        "choices between replies to different messages": 1,
        "ratings without an opposite rating of the same messages": 1,  # 5: liked, nothing disliked beside it
    }
    assert (summary["rows"], summary["from_choices"], summary["from_ratings"]) == (2, 1, 1)


def test_dpo_conflicts_duplicates_and_identical_replies(tmp_path):
    """Each liked reply with each disliked one to the same messages; one pair per two texts; a choice decides over
    ratings; texts liked and disliked both ways teach nothing; a choice between identical texts is no pair."""
    texts = {1: "A", 2: "B", 3: "C", 4: "A", 5: "D", 6: "E", 7: "E", 8: "D", 9: "F", 10: "F"}
    question = {n: "Q1?" if n <= 4 else "Q2?" if n <= 8 else "Q3?" for n in texts}
    requests = [request(n, [{"role": "user", "content": question[n]}], t) for n, t in texts.items()]
    ratings = {1: 1, 2: -1, 3: -1, 4: 1, 5: 1, 6: -1, 7: 1, 8: -1}
    feedback = [{"id": f"chatcmpl-{n}", "rating": r} for n, r in ratings.items()]
    feedback += [{"id": "chatcmpl-3", "better_than": "chatcmpl-1"}, {"id": "chatcmpl-9", "better_than": "chatcmpl-10"}]
    summary, rows = export(make_log(tmp_path / "log", requests, feedback, torn=False), tmp_path / "d.jsonl", "dpo")
    got = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["from"]) for r in rows]
    # Q1: A over B once (1 and 4 are both A), C over A as chosen side by side (not A over C from the ratings);
    # Q2: D over E (5, 6) and E over D (7, 8) contradict: no pair; Q3: F and F are the same reply
    assert got == [("Q1?", "A", "B", "rating"), ("Q1?", "C", "A", "choice")]
    assert summary["skipped"] == {"choices between identical replies": 1, "conflicting ratings": 4}


def test_a_reply_cut_at_max_tokens_is_only_ever_the_worse_one(tmp_path):
    """Side by side, a base model that rambles to max_tokens loses to the tuned reply: that pair is kept (the cut
    reply as `rejected`); a cut reply chosen or liked makes no pair, and never a KTO row."""
    q = [{"role": "user", "content": "Order?"}]
    requests = [
        request(1, q, "{}"),
        request(2, q, "I am sorry for your loss, I am sorry", finish="length"),
        request(3, q, "I cannot", finish="length"),
    ]
    feedback = [
        {"id": "chatcmpl-1", "better_than": "chatcmpl-2"},  # kept: the finished reply over the cut one
        {"id": "chatcmpl-3", "better_than": "chatcmpl-1"},  # a cut reply chosen: no pair
        {"id": "chatcmpl-2", "rating": -1},
    ]
    log = make_log(tmp_path / "log", requests, feedback, torn=False)
    summary, rows = export(log, tmp_path / "d.jsonl", "dpo")
    got = [(r["chosen"][0]["content"], r["rejected"][0]["content"], r["from"]) for r in rows]
    assert got == [("{}", "I am sorry for your loss, I am sorry", "choice")]
    assert summary["skipped"]["cut at max_tokens"] == 1
    result = runner.invoke(app, ["feedback", str(log), "-o", str(tmp_path / "k.jsonl")])
    assert result.exit_code == 2 and "cut at max_tokens" in result.output  # the one rating is of a cut reply


@pytest.fixture(scope="module")
def recipes(exported, tiny_model_dir) -> dict[str, Path]:
    """A recipe per objective with data.train the exported file: LoRA, 2 steps of 2 (KTO needs 2 a batch)."""
    folder = exported[0]
    return {o: write_recipe(folder / o, tiny_model_dir, o, folder / f"{o}.jsonl") for o in ("kto", "dpo")}


def test_loader_validate_and_preview_read_what_was_written(exported, recipes, tokenizer):
    from finetune_cli.data import jsonl

    folder, _, _ = exported
    for name, fmt, count in (("kto.jsonl", "unpaired_preference", 4), ("dpo.jsonl", "preference", 2)):
        records, errors, found = jsonl.parse(folder / name)
        assert not errors and found == fmt and len(records) == count
        written = [json.loads(line) for line in (folder / name).read_text().splitlines()]
        keys = ("prompt", "completion", "label") if fmt != "preference" else ("prompt", "chosen", "rejected")
        assert [{k: r[k] for k in keys} for r in records] == [{k: w[k] for k in keys} for w in written]
    for objective in ("kto", "dpo"):
        result = runner.invoke(app, ["validate", str(recipes[objective]), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["stats"]["examples"] == (4 if objective == "kto" else 2)
    # what training sees of the multi-turn reply is the served conversation in the model's own chat template
    result = runner.invoke(app, ["preview", str(recipes["kto"]), "--index", "2", "--json"])
    (shown,) = json.loads(result.stdout)
    prompt = "".join(t["text"] for t in shown["tokens"] if not t["learned"])
    learned = "".join(t["text"] for t in shown["tokens"] if t["learned"])
    assert prompt == tokenizer.apply_chat_template(JOKE, tokenize=False, add_generation_prompt=True)
    assert learned == "Why did the chicken cross the road?<|im_end|>"


def write_recipe(folder: Path, model_dir: Path, objective: str, data: Path) -> Path:
    folder.mkdir(exist_ok=True)
    recipe = {
        "model": {"base": str(model_dir)},
        "data": {"train": str(data), "max_length": 64, "cache": False},
        "method": {"name": "lora", "r": 4},
        "training": {"objective": objective, "max_steps": 2, "batch_size": 2, "save_steps": None, "logging_steps": 1},
        "output": {"dir": str(folder / "run")},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return folder / "recipe.yaml"


@pytest.mark.parametrize("objective", ["kto", "dpo"])
def test_feedback_trains(recipes, objective):
    """serve -> feedback -> train: a short run on the exported file completes."""
    result = runner.invoke(app, ["train", str(recipes[objective]), "--samples", "0", "--json"])
    assert result.exit_code == 0, result.output
    run = recipes[objective].parent / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["objective"] == objective and info["steps"] == 2
    assert info["data"]["train"]["examples"] == {"kto": 4, "dpo": 2}[objective]
    # the policy starts as the reference: KTO's loss is 1 - sigmoid(0), DPO's -log sigmoid(0)
    assert info["first_loss"] == pytest.approx({"kto": 0.5, "dpo": math.log(2)}[objective], abs=1e-3)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def refused(args: list[str], folder: Path, says: str) -> None:
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    result = runner.invoke(app, ["feedback", *map(str, args)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and says in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing written, no temporary


def test_bad_input_is_exit_2_with_one_line_and_nothing_written(tmp_path):
    log = make_log(tmp_path / "log")
    out = tmp_path / "out.jsonl"
    plain = tmp_path / "plain"
    plain.mkdir()
    refused([plain, "-o", out], tmp_path, f"{plain} is not a request log of ftune serve (it has no .ftune marker")
    refused([tmp_path / "nowhere", "-o", out], tmp_path, "give the DIR of `ftune serve --log-requests DIR`")
    run = tmp_path / "run"
    run.mkdir()
    rundir.mark(run, "run")
    refused([run, "-o", out], tmp_path, "(it holds a run output of ftune); give the DIR")
    (tmp_path / "mine.jsonl").write_text("my own data\n")
    refused([log, "-o", tmp_path / "mine.jsonl"], tmp_path, "ftune never overwrites a file it did not write")
    refused([log, "-o", tmp_path / "no" / "out.jsonl"], tmp_path, f"the folder {tmp_path / 'no'} does not exist")
    refused([log, "-o", out, "--format", "orpo"], tmp_path, "use kto (rated replies) or dpo (pairs)")
    refused([log, "-o", tmp_path / "out.csv"], tmp_path, "name it .jsonl")
    corrupt = make_log(tmp_path / "corrupt", torn=False)
    good = (corrupt / "requests.jsonl").read_text().splitlines(keepends=True)
    (corrupt / "requests.jsonl").write_text(good[0] + '{"id": "chatcmpl-x", "reply": \n' + "".join(good[1:]))
    refused([corrupt, "-o", out], tmp_path, f"{corrupt / 'requests.jsonl'}:2: not a JSON line")
    make_log(corrupt, feedback=[*FEEDBACK[:3], {"id": "chatcmpl-1", "rating": 5}], torn=False)
    refused([corrupt, "-o", out], tmp_path, f'{corrupt / "feedback.jsonl"}:4: "rating" must be 1 or -1')
    bare = make_log(tmp_path / "bare", feedback=None)
    refused([bare, "-o", out], tmp_path, "no feedback yet in")
    (bare / "feedback.jsonl").write_text('{"id": "chatcmpl-1", "rat')  # only half a line: still nothing
    refused([bare, "-o", out], tmp_path, "no feedback yet in")
    make_log(bare, feedback=[{"id": "chatcmpl-3", "rating": 1}, {"id": "chatcmpl-4", "rating": -1}])  # cut; not chat
    refused([bare, "-o", out], tmp_path, "(skipped 1 (completions API), 1 (cut at max_tokens)")
    make_log(bare, feedback=[{"id": "chatcmpl-2", "rating": 1}])
    refused([bare, "-o", out, "--format", "dpo"], tmp_path, "use --format kto for single ratings")
    (bare / "requests.jsonl").unlink()
    refused([bare, "-o", out], tmp_path, "requests.jsonl is missing")


def test_a_whole_last_line_without_its_newline_is_read(tmp_path):
    """A file edited by hand may lose its final newline: a complete JSON object is still a rating."""
    log = make_log(tmp_path / "log", feedback=[], torn=False)
    (log / "feedback.jsonl").write_text(json.dumps({"id": "chatcmpl-2", "rating": 1}))
    summary, rows = export(log, tmp_path / "k.jsonl", "kto")
    assert rows == [{k: v for k, v in KTO[1].items() if k != "comment"}]
    assert summary["skipped"] == {}
    assert describe(summary).endswith("every row is desirable: KTO learns best from both kinds")


def test_an_imbalance_of_thumbs_names_the_kto_weight_that_evens_it():
    summary = {"format": "kto", "output": "k.jsonl", "rows": 7, "requests": 9, "skipped": {}}
    assert describe({**summary, "desirable": 6, "undesirable": 1}).endswith("`training.undesirable_weight: 6`")
    assert describe({**summary, "desirable": 2, "undesirable": 5}).endswith("`training.desirable_weight: 2.5`")
    assert describe({**summary, "desirable": 300, "undesirable": 9}).endswith("`training.undesirable_weight: 33.33`")
    assert "consider" not in describe({**summary, "desirable": 4, "undesirable": 3})
