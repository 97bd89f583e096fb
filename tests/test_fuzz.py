"""Fuzzing `ftune validate` and `ftune train` with random and mutated recipes and JSONL: every run ends with exit
0, 1 or 2, a one-line error, never a traceback; validate writes nothing, train nothing outside its output folder."""

import copy
import json
import random

import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli.cli import app
from finetune_cli.data import cache
from tests.conftest import conversation

runner = CliRunner()
VALUES = [
    None,
    "",
    "x",
    -1,
    0,
    1,
    2.5,
    1e30,
    -1e-9,
    True,
    [],
    [1, "a"],
    {},
    {"a": 1},
    "nan",
    "inf",
    "all-linear",
    "lora",
    "full",
    "qlora",
    "prompt_tuning",
    "bf16",
    "fp16",
    "../../etc",
    "\x00",
    "é" * 50,
    float("inf"),
    float("-inf"),
    float("nan"),
    -(2**40),
    2**40,
    10**30,
    "#1 priority: JSON",
]
# Lines that once stopped every command with a raw exception, or were trained on as U+FFFD: each must be listed
# as one bad line by validate and refused by train with one `error:` line.
HOSTILE = [
    b"[" * 100_000,
    b'{"messages": ' + b'{"a": ' * 50_000,
    b'{"text": ' + b"9" * 5000 + b"}",
    b'{"messages": [{"role": "user", "content": "' + b"1" * 5000 + b'"}, {"role": "assistant", "content": 1e999}]}',
    b'{"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "a"}]}',
    b'{"conversations": [{"from": {"human": 1}, "value": "hi"}, {"from": "gpt", "value": "a"}]}',
    b'{"conversations": [{"from": "human", "value": {"a": [1]}}, {"from": "gpt", "value": "a"}]}',
    b'{"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "a"}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}, '
    b'{"role": "assistant", "content": "a"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "train": {"x": 1}}]}',
    b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "a"}]}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}',
    b"\xff\xfe{\x00}\x00",
    b"\xef\xbb\xbf" + json.dumps(conversation(1)).encode(),  # a byte order mark past the first line is not JSON
]
HOSTILE_SETS = [
    "training.seed=-1",
    "training.seed=4294967296",
    "training.epochs=.inf",
    "training.learning_rate=.nan",
    "training.weight_decay=inf",
    "training.max_grad_norm=-.inf",
    "training.warmup_ratio=nan",
    "method.alpha=.inf",
    "training.seed=" + "9" * 5000,
    "data.max_length=" + "[" * 5000,
    "data.system_prompt=caf\udce9",
]


def valid_recipe(model_dir):
    return {
        "model": {"base": str(model_dir)},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "training": {"max_steps": 1, "batch_size": 2, "save_steps": 1},
        "output": {"dir": "out"},
    }


def mutate_recipe(rng, recipe):
    recipe = copy.deepcopy(recipe)
    for _ in range(rng.randint(1, 3)):
        section = rng.choice(["model", "data", "method", "training"])  # output.dir is where writing is allowed
        if not isinstance(recipe[section], dict) or rng.random() < 0.1:
            recipe[section] = rng.choice(VALUES)
            continue
        keys = list(recipe[section]) or ["x"]
        choice = rng.random()
        key = rng.choice(keys)
        if choice < 0.4:
            recipe[section][key] = rng.choice(VALUES)
        elif choice < 0.6:
            recipe[section].pop(key, None)
        elif choice < 0.8:
            recipe[section][key[:-1] + rng.choice("xyz_")] = rng.choice(VALUES)
        else:
            field = rng.choice(
                [
                    "epochs",
                    "learning_rate",
                    "precision",
                    "optimizer",
                    "num_virtual_tokens",
                    "bits",
                    "lr_scheduler",
                    "train_on",
                    "eval_split",
                    "dtype",
                    "chat_template",
                    "use_dora",
                    "seed",
                    "weight_decay",
                    "max_grad_norm",
                    "warmup_ratio",
                    "system_prompt",
                ]
            )
            recipe[section][field] = rng.choice(VALUES)
    return recipe


def jsonl_lines(rng, n):
    """n random lines as bytes: good, wrong, cut, hostile, random characters; sometimes a byte order mark first."""
    lines = []
    for i in range(n):
        r = rng.random()
        if r < 0.1:
            lines.append(rng.choice(HOSTILE))
            continue
        if r < 0.6:
            lines.append(json.dumps(conversation(i, turns=rng.randint(1, 2))))
        elif r < 0.7:
            lines.append(
                json.dumps(
                    {"messages": [{"role": rng.choice(["user", "assistant", "bot", 3]), "content": rng.choice(VALUES)}]}
                )
            )
        elif r < 0.8:
            lines.append(json.dumps(rng.choice(VALUES)))
        elif r < 0.9:
            lines.append(json.dumps(conversation(i))[: rng.randint(0, 40)])
        else:
            lines.append("".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 30))).replace("\n", " "))
    lines = [x if isinstance(x, bytes) else x.encode("utf-8") for x in lines]
    return b"\xef\xbb\xbf" * (rng.random() < 0.1) + b"\n".join(lines) + b"\n"


@pytest.mark.slow
def test_fuzz_train(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(cache, "directory", lambda: tmp_path / "cache")
    rng = random.Random(1234)
    base = valid_recipe(tiny_model_dir)
    seen = {0: 0, 1: 0, 2: 0}
    validated = {0: 0, 1: 0, 2: 0}
    for case in range(150):
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        monkeypatch.chdir(folder)  # output.dir "out" is relative to the working directory
        clean = rng.random() < 0.5
        (folder / "train.jsonl").write_bytes(
            "\n".join(json.dumps(conversation(i)) for i in range(4)).encode()
            if clean
            else jsonl_lines(rng, rng.randint(0, 6))
        )
        (folder / "eval.jsonl").write_bytes(
            jsonl_lines(rng, 2) if rng.random() < 0.3 else json.dumps(conversation(9)).encode()
        )
        recipe = mutate_recipe(rng, base) if rng.random() < 0.7 else base
        text = yaml.safe_dump(recipe) if rng.random() < 0.9 else yaml.safe_dump(recipe)[: rng.randint(0, 60)] + ":["
        (folder / "recipe.yaml").write_text(text)
        before = {p for p in folder.rglob("*")}
        check = runner.invoke(app, ["validate", str(folder / "recipe.yaml")], env={"HF_HUB_OFFLINE": "1"})
        where = f"case {case} (validate): {text!r}\n{check.output}"
        assert check.exit_code in (0, 1, 2) and "Traceback" not in check.output, where
        assert check.exception is None or isinstance(check.exception, SystemExit), where
        if check.exit_code == 2:
            lines = check.stderr.strip().splitlines()
            assert lines and lines[-1].startswith("error: ") and sum(x.startswith("error:") for x in lines) == 1, where
        assert {p for p in folder.rglob("*")} == before, where  # validate writes nothing
        validated[check.exit_code] += 1
        result = runner.invoke(
            app, ["train", str(folder / "recipe.yaml"), "--samples", "0"], env={"HF_HUB_OFFLINE": "1"}
        )
        where = f"case {case}: {text!r}\n{result.output}"
        assert result.exit_code in (0, 1, 2), where
        assert result.exception is None or isinstance(result.exception, SystemExit), where
        assert "Traceback" not in result.output, where
        if result.exit_code:
            lines = result.stderr.strip().splitlines()
            assert lines and lines[-1].startswith("error: ") and sum(x.startswith("error:") for x in lines) == 1, where
        outside = {p for p in folder.rglob("*")} - before
        assert all("out" in p.relative_to(folder).parts[:1] for p in outside), (where, outside)
        seen[result.exit_code] += 1
        if check.exit_code == 0 and result.exit_code == 2:  # validate passed what train refused
            assert "cannot train this recipe" in check.output.replace("\n", " "), where
    assert seen[0] > 5 and seen[2] > 50, seen  # both paths were exercised
    assert all(validated.values()), validated


def one_error_line(result, where):
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output, where
    assert result.exception is None or isinstance(result.exception, SystemExit), (where, result.exception)
    assert lines and lines[-1].startswith("error: ") and sum(x.startswith("error:") for x in lines) == 1, where
    return lines[-1]


def test_fuzz_hostile_lines_and_values(tmp_path, tiny_model_dir, monkeypatch):
    """Valid recipes with hostile data lines (each one, plus a random second) or a hostile --set value (each one),
    fast: every case fails before training. validate lists each hostile line (exit 1) or refuses the value
    (exit 2); train refuses either with one `error:` line naming the line or --set (exit 2); nothing is written."""
    monkeypatch.setattr(cache, "directory", lambda: tmp_path / "cache")
    rng = random.Random(99)
    for case, (line, value) in enumerate([(x, None) for x in HOSTILE] + [(None, x) for x in HOSTILE_SETS]):
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        monkeypatch.chdir(folder)
        lines = [json.dumps(conversation(i)).encode() for i in range(4)]
        # (the last hostile line starts with a BOM: harmless as the file's first bytes, so never on line 1)
        bad = sorted(rng.sample(range(line is HOSTILE[-1], 4), rng.randint(1, 2))) if line else []
        for n in bad:
            lines[n] = line if n == bad[-1] else rng.choice(HOSTILE[:-1])
        bom = b"\xef\xbb\xbf" if rng.random() < 0.5 else b""  # accepted at the start of a file
        (folder / "train.jsonl").write_bytes(bom + b"\n".join(lines) + b"\n")
        (folder / "eval.jsonl").write_text(json.dumps(conversation(9)) + "\n", encoding="utf-8")
        recipe = valid_recipe(tiny_model_dir)
        recipe["data"]["format"] = "messages"  # a ShareGPT line first would make the rest "other format"
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
        sets = [f"--set={value}"] if value else []
        before = set(folder.rglob("*"))
        where = f"case {case}: lines {bad}, {[s[:60] for s in sets]}"

        check = runner.invoke(app, ["validate", str(folder / "recipe.yaml"), "--json", *sets])
        if sets:
            assert check.exit_code == 2 and one_error_line(check, where).startswith("error: --set: '"), where
        else:
            assert check.exit_code == 1, (where, check.output)
            report = json.loads(check.stdout)
            listed = {int(e["where"].rsplit(":", 1)[1]) for items in report["errors"].values() for e in items}
            assert listed == {n + 1 for n in bad} and report["files"][0]["examples"] == 4 - len(bad), where
        assert set(folder.rglob("*")) == before, where

        result = runner.invoke(app, ["train", str(folder / "recipe.yaml"), "--samples", "0", *sets])
        assert result.exit_code == 2, (where, result.output)
        error = one_error_line(result, where)
        assert error.startswith("error: --set: '" if sets else f"error: {folder / 'train.jsonl'}:{bad[0] + 1}: ")
        assert set(folder.rglob("*")) == before, where  # not even the run folder
