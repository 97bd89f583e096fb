"""`ftune validate`, `ftune preview` and the tokenized-data cache, checked against direct counts."""

import json
import math

import pytest
from typer.testing import CliRunner

from finetune_cli import recipe as recipes
from finetune_cli.cli import app
from finetune_cli.data import cache
from finetune_cli.data.masking import IGNORE
from tests.conftest import conversation, write_jsonl

runner = CliRunner()
BAD = {
    4: "{not json",
    9: '{"messages": [{"role": "user", "content": "only a question"}]}',
    13: '{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}',
    17: '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}',
    21: '{"instruction": "a", "output": "b"}',
    22: '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
}
KINDS = {
    4: "not JSON",
    9: "no assistant turn",
    13: "unknown role",
    17: "empty content",
    21: "other format",
    22: "wrong message order",
}


def recipe_file(tmp_path, model_dir, train="train.jsonl", extra=""):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model:\n  base: {model_dir}\ndata:\n  train: {train}\n  max_length: 40\n{extra}"
        "training:\n  batch_size: 3\n  gradient_accumulation: 2\n",
        encoding="utf-8",
    )
    return path


def validate(path, *args):
    result = runner.invoke(app, ["validate", str(path), "--json", *args])
    return result, json.loads(result.stdout) if result.stdout.strip() else None


def test_reports_exact_lines_of_planted_bad_lines(tmp_path, tiny_model_dir):
    lines = []
    for n in range(1, 26):
        lines.append(BAD.get(n) or json.dumps(conversation(n, system=n % 2 == 0, turns=1 + n % 3)))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result, report = validate(recipe_file(tmp_path, tiny_model_dir))
    assert result.exit_code == 1 and not report["ok"]
    found = {int(item["where"].rsplit(":", 1)[1]): kind for kind, items in report["errors"].items() for item in items}
    assert found == KINDS
    assert report["files"][0]["examples"] == 25 - len(BAD) and report["files"][0]["format"] == "messages"
    assert any("have no system message" in w for w in report["warnings"])
    human = runner.invoke(app, ["validate", str(tmp_path / "recipe.yaml")])
    assert human.exit_code == 1 and f"train.jsonl:{min(BAD)}: not valid JSON" in human.stderr.replace("\n", "")


def test_token_statistics_equal_a_direct_count(tmp_path, tiny_model_dir, tokenizer):
    convs = [conversation(i * 7, turns=1 + i % 4) for i in range(12)]
    convs.append(convs[4])  # line 13 repeats line 5
    write_jsonl(tmp_path / "train.jsonl", convs)
    result, report = validate(recipe_file(tmp_path, tiny_model_dir))
    assert result.exit_code == 0 and report["ok"], result.output
    # Direct count: render with the template, find each reply + <|im_end|> in the token stream.
    tokens, learned, lost = [], [], 0
    for c in convs:
        text = tokenizer.apply_chat_template(c["messages"], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_learned = 0
        kept = 0
        for m in c["messages"]:
            if m["role"] == "assistant":
                reply = tokenizer(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
                start = next(i for i in range(len(ids)) if ids[i : i + len(reply)] == reply)
                n_learned += len(reply)
                kept += max(0, min(start + len(reply), 40) - start)
        tokens.append(len(ids))
        learned.append(n_learned)
        lost += n_learned - kept
    s = report["stats"]
    srt = sorted(tokens)
    assert s["examples"] == 13
    assert s["tokens"] == {"min": srt[0], "p50": srt[math.ceil(0.5 * 13) - 1], "p95": srt[12], "max": srt[-1]}
    assert s["learned_tokens"]["max"] == max(learned) and s["learned_tokens"]["min"] == min(learned)
    assert s["over_max_length"] == sum(t > 40 for t in tokens) > 0
    assert s["learned_tokens_lost_to_truncation"] == lost > 0
    assert s["learned_tokens_per_epoch"] == sum(learned) - lost
    assert s["steps_per_epoch"] == math.ceil(13 / 6)
    data = tmp_path / "train.jsonl"
    assert f"{data}:13: duplicate of {data}:5" in report["warnings"]


def test_shipped_recipes_all_validate():
    for item in recipes.shipped():
        if "smollm2" not in item["name"] and item["name"] != "quickstart":
            continue  # GPU recipes name hub models: their tokenizers are not here offline
        result, report = validate(item["path"])
        # the DPO and classifier recipes have their own data
        expected = {"smollm2-dpo": 61, "smollm2-classify": 320, "smollm2-classify-chat": 320}.get(item["name"], 240)
        assert result.exit_code == 0 and report["ok"] and report["stats"]["examples"] == expected, item["name"]


def test_recipe_and_model_errors_are_usage_errors(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [conversation(1)])
    bad = recipe_file(tmp_path, tiny_model_dir, extra="  formt: auto\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "did you mean 'data.format'" in result.stderr
    result = runner.invoke(app, ["validate", str(recipe_file(tmp_path, tiny_model_dir, train="nope.jsonl"))])
    assert result.exit_code == 1 and "nope.jsonl:datafilenotfound" in "".join(result.stderr.split())  # wrapped anywhere


def test_preview_flags_match_the_training_labels(tmp_path, tiny_model_dir, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i, turns=2) for i in range(3)])
    path = recipe_file(tmp_path, tiny_model_dir)
    result = runner.invoke(app, ["preview", str(path), "--index", "1", "--count", "2", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert [s["source"].rsplit(":", 1)[1] for s in shown] == ["2", "3"]
    from finetune_cli.data.masking import tokenize

    ex = tokenize(tokenizer, conversation(1, turns=2)["messages"], 40)
    assert [t["id"] for t in shown[0]["tokens"]] == ex["input_ids"]
    assert [t["learned"] for t in shown[0]["tokens"]] == [lab != IGNORE for lab in ex["labels"]]
    assert shown[0]["truncated"] and "".join(t["text"] for t in shown[0]["tokens"]) == tokenizer.decode(ex["input_ids"])
    human = runner.invoke(app, ["preview", str(path)])
    assert human.exit_code == 0 and "learned" in human.stderr and "<|im_start|>" in human.stderr
    out_of_range = runner.invoke(app, ["preview", str(path), "--index", "3"])
    assert out_of_range.exit_code == 2 and "has 3 examples" in out_of_range.stderr


def test_cache_hit_and_misses(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(cache, "directory", lambda: tmp_path / "cache")
    from finetune_cli import models
    from finetune_cli.data import jsonl

    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(5)])
    path = recipe_file(tmp_path, tiny_model_dir)

    def tokenize(overrides=()):
        r = recipes.load(path, list(overrides))
        tok = models.load_tokenizer(str(tiny_model_dir), r.model.chat_template)
        return cache.tokenize(tok, jsonl.load(r.data, 0)[0], r.data.max_length, r.data.train_on)

    first, stats = tokenize()
    assert stats["cache"] == "miss"
    again, stats = tokenize()
    assert stats["cache"] == "hit" and again == first
    assert tokenize(["data.max_length=30"])[1]["cache"] == "miss"
    assert tokenize(["model.chat_template=zephyr"])[1]["cache"] == "miss"
    assert tokenize(["data.train_on=all"])[1]["cache"] == "miss"
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(1, 6)])
    assert tokenize()[1]["cache"] == "miss"
    assert tokenize()[1]["cache"] == "hit"
    off = cache.tokenize(
        models.load_tokenizer(str(tiny_model_dir)), [{"messages": conversation(1)["messages"]}], 40, "all", False
    )
    assert off[1]["cache"] == "off"


@pytest.mark.slow
def test_train_on_sharegpt_and_text_files_mixed(tmp_path, tiny_model_dir, monkeypatch):
    """Different formats in one run, a named template, eval_split, and the cache hit on the second run."""
    monkeypatch.setattr(cache, "directory", lambda: tmp_path / "cache")
    write_jsonl(
        tmp_path / "chat.jsonl",
        [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(6)],
    )
    write_jsonl(tmp_path / "text.jsonl", [{"text": "Plain text for continued pre-training. " * 20}])
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""model:
  base: {tiny_model_dir}
  chat_template: chatml
data:
  train:
    - chat.jsonl
    - {{path: text.jsonl, weight: 2}}
  eval_split: 0.2
  system_prompt: Be brief.
  max_length: 64
training:
  max_steps: 2
  batch_size: 2
output:
  dir: {tmp_path / "run"}
""",
        encoding="utf-8",
    )
    for attempt in ("miss", "hit"):
        result = runner.invoke(app, ["train", str(path), "--overwrite", "--samples", "0", "--json"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.stdout)
        assert info["status"] == "completed" and info["data"]["train"]["cache"] == attempt
        assert [f["used"] for f in info["data"]["train"]["files"]] == [5, 2]  # 1 of 6 chats held out; text x2
        assert info["data"]["eval"]["examples"] == 1
    template = (tmp_path / "run" / "adapter" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "Be brief" not in template


def test_nothing_left_to_learn_after_truncation_fails_as_in_train(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(4)])
    path = recipe_file(tmp_path, tiny_model_dir)
    result, report = validate(path, "--set", "data.max_length=20")  # the system prompt alone is longer
    assert result.exit_code == 1 and not report["ok"] and report["stats"]["learned_tokens_per_epoch"] == 0
    [error] = report["errors"]["nothing to learn"]
    assert error["where"] == str(tmp_path / "train.jsonl")
    assert error["message"].startswith("no example has a learned token left after truncation to 20")
    human = runner.invoke(app, ["validate", str(path), "--set", "data.max_length=20"])
    assert human.exit_code == 1 and "no example has a learned token left" in " ".join(human.stderr.split())
    # some examples left with nothing: a warning, as training drops them and goes on
    long = conversation(2)
    long["messages"][1]["content"] = "Please answer. " * 20
    write_jsonl(tmp_path / "train.jsonl", [conversation(1), long])
    result, report = validate(path, "--set", "data.max_length=30")
    assert result.exit_code == 0 and report["ok"], result.output
    assert (
        f"1 conversations have no learned token left after truncation to 30 (training drops them; first: "
        f"{tmp_path / 'train.jsonl'}:2)" in report["warnings"]
    )


def test_max_length_past_the_model_context_warns(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(3)])
    path = recipe_file(tmp_path, tiny_model_dir)
    result, report = validate(path, "--set", "data.max_length=513")  # the tiny model's context is 512
    assert result.exit_code == 0 and report["ok"]
    assert any("data.max_length 513 is longer than the model's context (512 tokens" in w for w in report["warnings"])
    result, report = validate(path, "--set", "data.max_length=512")
    assert not any("context" in w for w in report["warnings"])


def test_unreadable_lines_are_listed_not_raised(tmp_path, tiny_model_dir):
    good = json.dumps(conversation(1)).encode()
    lines = [
        b"\xef\xbb\xbf" + good,  # a byte order mark on the first line is fine
        b"[" * 100_000,
        b'{"text": ' + b"1" * 5000 + b"}",
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}',
        b'{"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "ok"}]}',
        good.replace(b"plus", b"\\ud800"),
    ]
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result, report = validate(recipe_file(tmp_path, tiny_model_dir))
    assert result.exit_code == 1 and report["files"][0]["examples"] == 1, result.output
    found = {int(e["where"].rsplit(":", 1)[1]): kind for kind, items in report["errors"].items() for e in items}
    assert found == {2: "not JSON", 3: "not JSON", 4: "not UTF-8", 5: "unknown role", 6: "not UTF-8"}


def test_a_truncated_parquet_file_is_not_a_missing_file(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([conversation(i) for i in range(20)]), tmp_path / "train.parquet")
    data = (tmp_path / "train.parquet").read_bytes()
    (tmp_path / "train.parquet").write_bytes(data[: len(data) // 2])
    result, report = validate(recipe_file(tmp_path, tiny_model_dir, train="train.parquet"))
    assert result.exit_code == 1 and list(report["errors"]) == ["not Parquet"], result.output
    [error] = report["errors"]["not Parquet"]
    assert error["where"] == str(tmp_path / "train.parquet")
    assert error["message"].startswith("not a readable Parquet file, corrupt or truncated (")
    result, report = validate(recipe_file(tmp_path, tiny_model_dir, train="gone.parquet"))
    assert result.exit_code == 1 and report["errors"]["missing file"][0]["where"] == str(tmp_path / "gone.parquet")
    (tmp_path / "object.json").write_text(json.dumps({"rows": [conversation(1)]}, indent=1), encoding="utf-8")
    result, report = validate(recipe_file(tmp_path, tiny_model_dir, train="object.json"))
    assert list(report["errors"]) == ["unreadable data"], result.output  # there, but not data ftune can read


def classify_recipe(tmp_path, model_dir, train, evals=None, extra=""):
    """A classification recipe over rows written to train.jsonl (and eval.jsonl)."""
    write_jsonl(tmp_path / "train.jsonl", train)
    if evals is not None:
        write_jsonl(tmp_path / "eval.jsonl", evals)
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model:\n  base: {model_dir}\ndata:\n  train: train.jsonl\n"
        + ("  eval: eval.jsonl\n" if evals is not None else "")
        + f"  max_length: 12\n{extra}training:\n  objective: classification\n  batch_size: 4\n",
        encoding="utf-8",
    )
    return path


def test_classification_counts_tokens_and_imbalance(tmp_path, builtin_dir, tokenizer):
    from collections import Counter

    train = [{"text": "word " * (1 + i % 17), "label": ["spam", "ham", 7][i % 9 // 4]} for i in range(45)]
    evals = [{"text": f"eval row {i}", "label": ["ham", "spam"][i % 2]} for i in range(5)]
    path = classify_recipe(tmp_path, builtin_dir, train, evals)
    result, report = validate(path)
    assert result.exit_code == 0 and report["ok"], result.output
    s = report["stats"]
    expected = Counter(str(r["label"]) for r in train)
    assert s["labels"] == dict(expected) and sum(s["labels"].values()) == s["examples"] == 45
    assert s["eval"]["labels"] == {**{k: 0 for k in expected}, **Counter(r["label"] for r in evals)}
    assert s["imbalance"] == round(max(expected.values()) / min(expected.values()), 2) > 3
    lengths = sorted(len(tokenizer(r["text"])["input_ids"]) for r in train)
    assert s["tokens"] == {"min": lengths[0], "p50": lengths[22], "p95": lengths[42], "max": lengths[-1]}
    assert s["over_max_length"] == sum(n > 12 for n in lengths) > 0
    assert s["steps_per_epoch"] == math.ceil(45 / 4) and "learned_tokens" not in s
    assert any("training.class_weights: balanced" in w for w in report["warnings"])
    assert any(w.startswith(f"{sum(n > 12 for n in lengths)} texts are longer than") for w in report["warnings"])
    result, report = validate(path, "--set", "training.class_weights=balanced")
    assert not any("imbalanced" in w for w in report["warnings"])
    human = runner.invoke(app, ["validate", str(path)])
    text = " ".join(human.stderr.split())
    assert (
        human.exit_code == 0
        and f"│ spam │ {expected['spam']} │ 2 │" in text
        and f"class in training): {s['imbalance']}" in text
    )


@pytest.mark.parametrize(
    "train, evals, extra, kind, where",
    [
        (
            [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
            [{"text": "c", "label": "z"}],
            "",
            "labels",
            "eval.jsonl:1",
        ),
        ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], None, "", "labels", "train.jsonl"),
        (
            [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "w"}],
            None,
            "  labels: [x, y]\n",
            "labels",
            "train.jsonl:3",
        ),
        (
            [{"text": "a", "label": "x"}, {"text": "", "label": "y"}, {"text": "c", "label": "y"}],
            None,
            "",
            "empty content",
            "train.jsonl:2",
        ),
        (
            [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": False}],
            None,
            "",
            "wrong type",
            "train.jsonl:3",
        ),
    ],
)
def test_classification_errors_name_their_rows(tmp_path, builtin_dir, train, evals, extra, kind, where):
    result, report = validate(classify_recipe(tmp_path, builtin_dir, train, evals, extra))
    assert result.exit_code == 1 and not report["ok"], result.output
    assert list(report["errors"]) == [kind]
    assert [e["where"] for e in report["errors"][kind]] == [str(tmp_path / where)]


def test_classification_rows_under_sft_are_an_objective_error(tmp_path, builtin_dir):
    path = classify_recipe(tmp_path, builtin_dir, [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    result, report = validate(path, "--set", "training.objective=sft")
    assert result.exit_code == 1 and list(report["errors"]) == ["objective"], result.output
    [error] = report["errors"]["objective"]
    assert (
        error["where"] == f"{tmp_path / 'train.jsonl'}:1" and "training.objective: classification" in error["message"]
    )


def test_classification_preview_shows_tokens_and_label(tmp_path, builtin_dir, tokenizer):
    rows = [{"text": "first text to classify", "label": "b"}, {"text": "second " * 20, "label": "a"}]
    path = classify_recipe(tmp_path, builtin_dir, rows, extra="  labels: [b, a]\n")
    result = runner.invoke(app, ["preview", str(path), "--count", "2", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert [(s["label"], s["class_id"]) for s in shown] == [("b", 0), ("a", 1)]
    assert [t["id"] for t in shown[0]["tokens"]] == tokenizer(rows[0]["text"])["input_ids"]
    assert [t["id"] for t in shown[1]["tokens"]] == tokenizer(rows[1]["text"])["input_ids"][:12] and shown[1][
        "truncated"
    ]
    human = runner.invoke(app, ["preview", str(path)])
    assert human.exit_code == 0 and "label b (class id 0)" in human.stderr


def test_classification_images_need_no_tokenizer(tmp_path, builtin_dir, monkeypatch):
    from collections import Counter

    from PIL import Image

    from finetune_cli import models

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("image rows load no tokenizer")

    monkeypatch.setattr(models, "load_tokenizer", no_tokenizer)
    for i in range(5):
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [{"image": f"{i}.png", "label": "cat" if i < 3 else "dog"} for i in range(5)]
    path = classify_recipe(tmp_path, builtin_dir, rows)
    result, report = validate(path)
    assert result.exit_code == 0 and report["ok"], result.output
    assert report["stats"]["labels"] == dict(Counter(r["label"] for r in rows)) and "tokens" not in report["stats"]
    shown = json.loads(runner.invoke(app, ["preview", str(path), "--json"]).stdout)
    assert shown[0]["image"] == str(tmp_path / "0.png") and shown[0]["label"] == "cat"
    path = classify_recipe(tmp_path, builtin_dir, [*rows, {"image": "broken.png", "label": "dog"}])
    result, report = validate(path)
    assert result.exit_code == 1 and [e["where"] for e in report["errors"]["image"]] == [
        f"{tmp_path / 'train.jsonl'}:6"
    ]
