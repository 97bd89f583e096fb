"""Bad input through the real CLI: exit code 2, one `error:` line naming the problem, no traceback, nothing written."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from finetune_cli.cli import app
from tests.conftest import ROOT

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]


def break_line(path, lineno, text):
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = text + "\n"
    path.write_text("".join(lines))


CASES = {
    "missing recipe": (lambda r: r.unlink(), ["recipe file not found"]),
    "yaml syntax": (lambda r: r.write_text(r.read_text() + "data: [oops\n"), ["YAML syntax error", "recipe.yaml:"]),
    "unknown key": (
        lambda r: r.write_text(r.read_text().replace("max_steps", "max_step")),
        ["recipe.yaml:12: unknown key 'training.max_step'; did you mean 'training.max_steps'?"],
    ),
    "wrong type": (
        lambda r: r.write_text(r.read_text().replace("batch_size: 4", "batch_size: four")),
        ["'training.batch_size' is 'four'", "integer"],
    ),
    "missing data": (lambda r: (r.parent / "train.jsonl").unlink(), ["train.jsonl: data file not found"]),
    "not json": (lambda r: break_line(r.parent / "train.jsonl", 3, "{oops"), ["train.jsonl:3: not valid JSON"]),
    "no assistant": (
        lambda r: break_line(r.parent / "train.jsonl", 2, json.dumps({"messages": [{"role": "user", "content": "x"}]})),
        ["train.jsonl:2: conversation has no assistant turn"],
    ),
    "unknown role": (
        lambda r: break_line(r.parent / "eval.jsonl", 4, json.dumps({"messages": [{"role": "bot", "content": "x"}]})),
        ["eval.jsonl:4: message 0 has unknown role 'bot'"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(tiny_recipe, case):
    spoil, needles = CASES[case]
    spoil(tiny_recipe)
    result = run("train", tiny_recipe)
    assert_user_error(result, *needles)
    assert not (tiny_recipe.parent / "run").exists()


def test_unknown_base_model(tiny_recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("train", tiny_recipe, "--set", "model.base=no-such-org/no-such-model")
    assert_user_error(result, "cannot load 'no-such-org/no-such-model'", "not a builtin name")
    assert not (tiny_recipe.parent / "run").exists()


def test_debug_shows_traceback(tiny_recipe):
    """The real command in a subprocess (CliRunner records any non-zero exit as an exception, so it cannot tell):
    with --debug the error comes with Python's traceback ending in the error itself; without it, one line."""

    def ftune(*args):
        # `python -m` from the checkout: this tree's finetune_cli, not whatever the venv's console script points at
        cmd = [sys.executable, "-m", "finetune_cli", *args, "train", str(tiny_recipe), "--set", "training.epochs=x"]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)

    debug = ftune("--debug")
    assert debug.returncode == 1, debug.stderr  # the exception propagated out of Python: not our exit 2
    assert "Traceback (most recent call last):" in debug.stderr, debug.stderr
    assert "finetune_cli/recipe.py" in debug.stderr  # the frames of the code that raised it
    last = debug.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune_cli.errors.FtuneError: ") and "'training.epochs' is 'x'" in last, last
    plain = ftune()
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr
    assert plain.stderr.startswith("error: ") and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert "'training.epochs' is 'x'" in plain.stderr


def test_console_script_and_module():
    bin_dir = __import__("pathlib").Path(sys.executable).parent
    out = subprocess.run([bin_dir / "ftune", "train", "/nonexistent.yaml"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr == "error: /nonexistent.yaml: recipe file not found\n"
    out = subprocess.run([sys.executable, "-m", "finetune_cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "train" in out.stdout


def test_readme_documents_every_command_and_option():
    """The README's command reference does not drift from the CLI."""
    import typer.main

    readme = (ROOT / "README.md").read_text()
    headings = [line for line in readme.splitlines() if line.startswith("### ")]

    def check(command, name):
        if hasattr(command, "commands"):
            for sub, child in command.commands.items():
                check(child, f"{name} {sub}".strip())
            return
        assert any(f"`ftune {name}" in h for h in headings), name
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help":
                    assert f"`{opt}" in readme, f"{name} {opt}"

    check(typer.main.get_command(app), "")
