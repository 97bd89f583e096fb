"""Never lose, mix or misreport a user's work: what --overwrite may replace, one run per folder, resume from any
state, numbers at one precision, and bad artifacts or flags refused before the slow work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_cli.cli import app
from tests.conftest import conversation, write_jsonl

runner = CliRunner()
FTUNE = Path(sys.executable).parent / "ftune"


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: what must survive a refused command untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output, result.output
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """Data, a recipe writing to a per-test output.dir, and one finished run for eval/merge/generate checks."""
    folder = tmp_path_factory.mktemp("rundir")
    write_jsonl(folder / "train.jsonl", [conversation(i, turns=1 + i % 2) for i in range(16)])
    write_jsonl(folder / "eval.jsonl", [conversation(i + 100) for i in range(4)])
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"model:\n  base: {tiny_model_dir}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n  max_length: 96\n"
        "method:\n  r: 4\ntraining:\n  max_steps: 2\n  batch_size: 8\n  learning_rate: 1.0e-2\n  save_steps: 1\n"
        f"output:\n  dir: {folder / 'run'}\n"
    )
    result = runner.invoke(app, ["train", str(recipe), "--samples", "0"])
    assert result.exit_code == 0, result.output
    return recipe, folder / "run"


def train(recipe, *args):
    return runner.invoke(app, ["train", str(recipe), "--samples", "0", *map(str, args)])


# A. --overwrite replaces only what ftune wrote; two runs never share a folder


@pytest.mark.parametrize("command", ["train", "merge-adapter"])
def test_overwrite_never_deletes_a_users_folder(setup, tmp_path, command):
    recipe, run = setup
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("my thesis")
    before = snapshot(precious)
    if command == "train":
        result = train(recipe, "--set", f"output.dir={precious}", "--overwrite")
    else:
        result = runner.invoke(app, ["merge-adapter", str(run), "-o", str(precious), "--overwrite"])
    assert result.exit_code == 2
    line = error_line(result)
    assert "thesis.txt" in line and "did not write" in line and "--overwrite" not in line.split("did not write")[1]
    assert snapshot(precious) == before
    # without --overwrite the refusal does not pretend the folder holds a run, nor invite the flag
    plain = train(recipe, "--set", f"output.dir={precious}")
    assert plain.exit_code == 2 and "already holds a run" not in plain.output and "thesis.txt" in plain.output


USERS_FOLDERS = {
    "issue": {"model/pytorch_model.bin": "w", "checkpoints/epoch3.pt": "c", "recipe.yaml": "mine"},
    "only-checkpoints": {"checkpoints/best.pt": "b"},
    "hf-model": {"model/config.json": "{}", "model/model.safetensors": "w", "checkpoints/epoch3.pt": "c"},
}


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
@pytest.mark.parametrize("contents", USERS_FOLDERS)
def test_a_users_folder_named_like_a_run_is_never_replaced(setup, tmp_path, contents, flag):
    """Names a run has (model/, checkpoints/, recipe.yaml) are no proof: without ftune's .ftune marker the folder is
    refused, naming what is there, and nothing in it changes (a resume would have called model/ a finished run
    and deleted checkpoints/)."""
    recipe, _ = setup
    out = tmp_path / "proj"
    for name, text in USERS_FOLDERS[contents].items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    result = train(recipe, "--set", f"output.dir={out}", flag)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    line = error_line(result)
    assert "did not write" in line and all(name.split("/")[0] in line for name in USERS_FOLDERS[contents])
    assert snapshot(out) == before


def test_a_run_without_its_marker_is_not_replaced(setup, tmp_path):
    """A run's run.json and recipe.yaml can be copied anywhere: only the .ftune marker proves the folder is ftune's."""
    recipe, run = setup
    out = copy_of(run, tmp_path)
    (out / ".ftune").unlink()
    before = snapshot(out)
    result = train(recipe, "--set", f"output.dir={out}", "--overwrite")
    assert result.exit_code == 2 and "did not write" in error_line(result) and "recipe.yaml" in error_line(result)
    assert snapshot(out) == before


def test_a_users_file_in_a_runs_checkpoints(setup, interrupted, tmp_path):
    """A run's checkpoints/ holds ftune's checkpoint-N folders; a finished, resumed or replaced run deletes it, so a
    user's checkpoints/epoch3.pt in it stops --overwrite and --resume, naming it."""
    recipe, _ = setup
    out = copy_of(interrupted, tmp_path)
    (out / "checkpoints" / "epoch3.pt").write_text("mine")
    before = snapshot(out)
    for flag in ("--overwrite", "--resume"):
        result = train(recipe, "--set", f"output.dir={out}", "--set", "training.max_steps=4", flag)
        assert result.exit_code == 2 and "checkpoints/epoch3.pt" in error_line(result), result.output
        assert snapshot(out) == before


@pytest.mark.parametrize("command", ["train", "merge-adapter", "export"])
def test_an_output_folder_inside_a_file(setup, tmp_path, command):
    recipe, run = setup
    afile = tmp_path / "README.md"
    afile.write_text("mine")
    out = afile / "sub"
    args = {
        "train": ["train", recipe, "--samples", "0", "--set", f"output.dir={out}"],
        "merge-adapter": ["merge-adapter", run, "-o", out],
        "export": ["export", run, "--format", "gguf", "-o", out],
    }[command]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert f"inside {afile}, which is a file" in error_line(result)
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


@pytest.mark.parametrize("command", [["serve"], ["generate", "-p", "hi"]])
def test_a_file_given_as_the_model(setup, command):
    """`ftune serve RUN/run.json`: the file is named as a file, and its run folder suggested."""
    _, run = setup
    result = runner.invoke(app, [command[0], str(run / "run.json"), *command[1:]])
    assert result.exit_code == 2
    line = error_line(result)
    assert "is a file, not a model" in line and line.endswith(f"the folder this file is in: {run}")


@pytest.mark.parametrize("where", [".", "~/", "/", ".."])  # `~/`: a bare `~` is YAML null (unset)
def test_current_home_root_and_parents_are_refused(setup, tmp_path, monkeypatch, where):
    recipe, _ = setup
    home, cwd = tmp_path / "home", tmp_path / "home" / "work"
    cwd.mkdir(parents=True)
    (cwd / "notes.txt").write_text("keep")
    (home / "keep.txt").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    result = train(recipe, "--set", f"output.dir={where}", "--overwrite")
    assert result.exit_code == 2
    assert "folder" in error_line(result) and "of its own" in error_line(result)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_ftunes_run_but_not_a_users_file_in_it(setup, tmp_path):
    recipe, _ = setup
    out = tmp_path / "out"
    assert train(recipe, "--set", f"output.dir={out}").exit_code == 0
    first = json.loads((out / "run.json").read_text())["started"]
    (out / "notes.md").write_text("my notes on this run")
    refused = train(recipe, "--set", f"output.dir={out}", "--overwrite")
    assert refused.exit_code == 2 and "notes.md" in error_line(refused)
    assert (out / "notes.md").read_text() == "my notes on this run" and (out / "adapter").is_dir()
    (out / "notes.md").unlink()
    time.sleep(1)
    replaced = train(recipe, "--set", f"output.dir={out}", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "run.json").read_text())["started"] != first


def test_overwrite_of_a_symlink_and_output_that_is_a_file(setup, tmp_path):
    recipe, run = setup
    link = tmp_path / "link"
    link.symlink_to(run, target_is_directory=True)
    before = snapshot(run)
    result = train(recipe, "--set", f"output.dir={link}", "--overwrite")
    assert result.exit_code == 2 and "symbolic link" in error_line(result)
    assert snapshot(run) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args in (["--set", f"output.dir={afile}"], ["--set", f"output.dir={afile}", "--overwrite"]):
        result = train(recipe, *args)
        assert result.exit_code == 2 and "is a file" in error_line(result)
    merge = runner.invoke(app, ["merge-adapter", str(run), "-o", str(afile), "--overwrite"])
    assert merge.exit_code == 2 and "is a file" in error_line(merge) and afile.read_text() == "x"


def test_merge_overwrite_replaces_its_own_output_only(setup, tmp_path):
    _, run = setup
    out = tmp_path / "merged"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".merged.tmp-{int(dead.stdout)}-0123abcd").mkdir()
    assert runner.invoke(app, ["merge-adapter", str(run), "-o", str(out)]).exit_code == 0
    marker = json.loads((out / ".ftune").read_text())
    assert marker["kind"] == "merge" and "config.json" in marker["files"]
    again = runner.invoke(app, ["merge-adapter", str(run), "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in error_line(again)
    assert runner.invoke(app, ["merge-adapter", str(run), "-o", str(out), "--overwrite"]).exit_code == 0
    (out / "my-eval.txt").write_text("mine")
    refused = runner.invoke(app, ["merge-adapter", str(run), "-o", str(out), "--overwrite"])
    assert refused.exit_code == 2 and "my-eval.txt" in error_line(refused) and (out / "my-eval.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temporary folder left, nor
    # the one a killed merge left (its process is gone): the first merge above removed it
    gguf = tmp_path / "gguf"  # another command's output, marked as ftune's: merge --overwrite leaves it alone
    gguf.mkdir()
    (gguf / ".ftune").write_text(json.dumps({"kind": "gguf", "files": ["m.gguf"]}))
    (gguf / "m.gguf").write_bytes(b"gguf")
    other = runner.invoke(app, ["merge-adapter", str(run), "-o", str(gguf), "--overwrite"])
    assert other.exit_code == 2 and "gguf output" in error_line(other) and (gguf / "m.gguf").read_bytes() == b"gguf"


def test_two_runs_into_one_folder(setup, tmp_path):
    """The second `ftune train` into a folder in use is refused (exit 2), even with --overwrite, and the first
    run's folder is not mixed."""
    recipe, _ = setup
    out = tmp_path / "shared-out"
    long_run = ["--samples", "0", "--set", f"output.dir={out}", "--set", "training.max_steps=5000"]
    first = subprocess.Popen(
        [FTUNE, "train", recipe, *long_run], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file():
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    started = json.loads((out / "run.json").read_text())["started"]
    second = subprocess.run(
        [FTUNE, "train", recipe, "--samples", "0", "--set", f"output.dir={out}", "--overwrite"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.poll() is None, "the first run ended before the second tried: the test proves nothing"
    assert second.returncode == 2, second.stderr
    assert "in use by another ftune run" in second.stderr.strip().splitlines()[-1]
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 130, err
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["started"] == started
    assert "max_steps: 5000" in (out / "recipe.yaml").read_text()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len([s for s in steps if s == 1]) == 1  # one writer: no step twice


def test_lock_is_free_again_after_its_process_dies(tmp_path):
    """A killed run leaves no stale lock: the kernel drops it with the process."""
    out = tmp_path / "out"
    code = f"from finetune_cli import rundir; import pathlib, time\nwith rundir.lock(pathlib.Path({str(out)!r})):\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", code + "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    from finetune_cli import rundir
    from finetune_cli.errors import FtuneError

    with pytest.raises(FtuneError, match="in use by another ftune run"):
        with rundir.lock(out):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with rundir.lock(out):
        pass


# B. resume from any state


def interrupted_run(recipe, out, at_step):
    """A run stopped by a second Ctrl-C inside step `at_step` (checkpoints every step before it)."""
    from transformers import TrainerCallback

    from finetune_cli import recipe as recipes
    from finetune_cli.training import train as training

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == at_step:
                raise KeyboardInterrupt

    loaded = recipes.load(recipe, [f"output.dir={out}", "training.max_steps=4"])
    with pytest.raises(KeyboardInterrupt):
        training.run(loaded, callbacks=[Interrupt()], samples=0)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


@pytest.fixture(scope="module")
def interrupted(setup, tmp_path_factory):
    """One run stopped inside step 3 (checkpoints 1 and 2 saved); each test works on its own copy."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    interrupted_run(setup[0], out, at_step=3)
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def test_torn_metrics_line_and_resume(interrupted, tmp_path):
    out = copy_of(interrupted, tmp_path)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # what kill -9 in the middle of a write leaves
    (out / "notes.md").write_text("mine")  # a resumed run leaves the user's files beside it alone
    result = runner.invoke(app, ["train", str(out), "--resume", "--samples", "0"])
    assert result.exit_code == 0, result.output
    assert (out / "notes.md").read_text() == "mine"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_trim_metrics_drops_later_rows_and_a_torn_line(tmp_path):
    from finetune_cli import rundir

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 1}\n{"step": 3, "loss": 1}\n{"step": 4, "lo')
    rundir.trim_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 1}\n{"step": 2, "loss": 1}\n'


def test_a_folder_with_only_checkpoints(setup, interrupted, tmp_path):
    """A run left with only its marker and checkpoints resumes; without the marker, checkpoint-N folders (which any
    transformers script writes) are no proof the folder is ftune's: refused, untouched."""
    import shutil

    recipe, _ = setup
    unmarked = Path(shutil.copytree(interrupted, tmp_path / "unmarked"))
    for name in ("run.json", "recipe.yaml", ".ftune", "metrics.jsonl", "loss.png", "report.html"):
        (unmarked / name).unlink()
    before = snapshot(unmarked)
    for flag in ((), ("--resume",), ("--overwrite",)):
        refused = train(recipe, "--set", f"output.dir={unmarked}", "--set", "training.max_steps=4", *flag)
        assert refused.exit_code == 2 and "did not write (.staging, checkpoints)" in error_line(refused)
    assert snapshot(unmarked) == before
    out = copy_of(interrupted, tmp_path)
    for name in ("run.json", "recipe.yaml", "metrics.jsonl"):
        (out / name).unlink()
    args = ["--set", f"output.dir={out}", "--set", "training.max_steps=4"]
    fresh = train(recipe, *args)
    assert fresh.exit_code == 2 and "--resume" in error_line(fresh) and "unfinished" in error_line(fresh)
    resumed = train(recipe, *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and "checkpoint-2" in info["resumed_from"]


def test_signal_during_final_samples_completes_the_run(setup, tmp_path, monkeypatch):
    """SIGTERM while the tuned model answers the sample prompts: the adapter is saved, so the run is completed,
    and --resume says so instead of failing on the saved adapter."""
    from finetune_cli import recipe as recipes
    from finetune_cli.training import train as training

    recipe, _ = setup
    out = tmp_path / "run"
    calls = []
    plain_reply = training.reply

    def reply(model, tokenizer, prompt):
        calls.append(prompt)
        if len(calls) == 3:  # the first answer after training (the base model answered the first two)
            assert (out / "adapter" / "adapter_model.safetensors").is_file()
            os.kill(os.getpid(), signal.SIGTERM)
        return plain_reply(model, tokenizer, prompt, max_new_tokens=2)

    monkeypatch.setattr(training, "reply", reply)
    result = training.run(recipes.load(recipe, [f"output.dir={out}"]), samples=2)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and result["status"] == "completed" and len(calls) == 3
    assert not (out / ".adapter.tmp").exists() and not (out / "checkpoints").exists()
    monkeypatch.undo()
    again = runner.invoke(app, ["train", str(out), "--resume"])
    assert again.exit_code == 0 and "already completed" in again.output


def test_resume_of_an_interrupted_run_whose_adapter_is_saved(setup, tmp_path):
    """What older versions left after a signal during the samples: status interrupted, adapter saved, checkpoints
    and a stale .adapter.tmp. Resume finishes it."""
    out = copy_of(setup[1], tmp_path)
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "status": "interrupted", "reason": "SIGTERM at step 2"}))
    (out / ".adapter.tmp").mkdir()
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    result = runner.invoke(app, ["train", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert "already completed" in result.output
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and "reason" not in info and not (out / "checkpoints").exists()
    assert not (out / ".adapter.tmp").exists()


def modes(folder: Path) -> dict:
    """The permission bits of `folder` and of every file and folder in it, by kind."""
    found = {"files": set(), "folders": set()}
    for p in [folder, *folder.rglob("*")]:
        found["folders" if p.is_dir() else "files"].add(oct(p.stat().st_mode & 0o7777))
    return found


def test_what_ftune_writes_has_the_modes_of_the_umask(setup, tmp_path):
    """Under umask 027 (not the usual 022, so no fixed mode passes) every file ftune writes is 0640 and every
    folder 0750: files written through a temporary (run.json, recipe.yaml, .ftune, eval.json), safetensors' own
    (0600 by themselves) in checkpoints, the adapter and a merged folder, and the folders renamed into place."""
    recipe, _ = setup
    out, merged = tmp_path / "run", tmp_path / "merged"
    seen = []
    umask = os.umask(0o027)
    try:
        interrupted_run(recipe, out, at_step=3)
        assert (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()
        seen.append(modes(out))
        assert runner.invoke(app, ["train", str(out), "--resume", "--samples", "0"]).exit_code == 0
        assert runner.invoke(app, ["eval", str(out)]).exit_code == 0
        assert (out / "eval.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
        seen.append(modes(out))
        assert runner.invoke(app, ["merge-adapter", str(out), "-o", str(merged)]).exit_code == 0
        seen.append(modes(merged))
    finally:
        os.umask(umask)
    assert seen == [{"files": {"0o640"}, "folders": {"0o750"}}] * 3


# C. numbers mean what they say


def test_eval_before_after_and_ftune_eval_agree_under_bf16(setup, tmp_path):
    """bf16 autocast in training must not change what eval measures: with a learning rate too small to move the
    adapter, before, after and `ftune eval` agree to 1e-6."""
    recipe, _ = setup
    out = tmp_path / "run"
    args = ["--set", f"output.dir={out}", "--set", "training.precision=bf16", "--set", "training.learning_rate=1e-30"]
    result = runner.invoke(app, ["train", str(recipe), "--samples", "0", "--json", *args])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    before, after = summary["eval_before"]["loss"], summary["eval_after"]["loss"]
    assert after == pytest.approx(before, rel=1e-6)
    scored = runner.invoke(app, ["eval", str(out), "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["results"]["tuned"]["loss"] == pytest.approx(before, rel=1e-6)


def test_eval_data_is_read_the_way_the_run_reads_its_data(tiny_model_dir, tmp_path):
    """Extra data in the run's own columns and without its system prompt scores like the run's eval data."""
    rows = [conversation(i, system=False) for i in range(12)]
    own = [{"dialog": [{"who": m["role"], "text": m["content"]} for m in r["messages"]]} for r in rows]
    write_jsonl(tmp_path / "train.jsonl", own[:8])
    write_jsonl(tmp_path / "eval.jsonl", own[8:])
    write_jsonl(tmp_path / "extra.jsonl", own[8:])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model:\n  base: {tiny_model_dir}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n  max_length: 96\n"
        "  columns: {messages: dialog, role: who, content: text}\n  system_prompt: Answer with the number.\n"
        f"training:\n  max_steps: 1\n  batch_size: 8\noutput:\n  dir: {tmp_path / 'run'}\n"
    )
    assert train(recipe).exit_code == 0
    own_eval = runner.invoke(app, ["eval", str(tmp_path / "run"), "--json"])
    extra = runner.invoke(app, ["eval", str(tmp_path / "run"), "--data", str(tmp_path / "extra.jsonl"), "--json"])
    assert own_eval.exit_code == 0 and extra.exit_code == 0, extra.output
    a, b = json.loads(own_eval.stdout)["results"]["tuned"], json.loads(extra.stdout)["results"]["tuned"]
    assert a["tokens"] == b["tokens"] and b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-9)
    # both results are kept, each naming its data; the model card names them too
    kept = json.loads((tmp_path / "run" / "eval.json").read_text())["evaluations"]
    assert sorted(e["data"][0] for e in kept) == sorted([str(tmp_path / "eval.jsonl"), str(tmp_path / "extra.jsonl")])
    merged = runner.invoke(app, ["merge-adapter", str(tmp_path / "run"), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    card = (tmp_path / "merged" / "README.md").read_text()
    assert str(tmp_path / "extra.jsonl") in card and str(tmp_path / "eval.jsonl") in card


# D. corrupt artifacts and bad flags: exit 2, one line naming the file or flag, before the slow work


def broken_copy(run: Path, tmp_path: Path, breaks) -> Path:
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(run, copy)
    breaks(copy)
    return copy


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "breaks, named",
    [
        (lambda r: truncate(r / "adapter" / "adapter_model.safetensors"), "adapter_model.safetensors"),
        (lambda r: (r / "adapter" / "adapter_config.json").unlink(), "adapter_config.json"),
        (lambda r: (r / "adapter" / "ftune.json").write_text("{not json"), "ftune.json"),
        (lambda r: (r / "run.json").write_text('{"status": "compl'), "run.json"),
    ],
    ids=["truncated-weights", "no-adapter-config", "corrupt-ftune-json", "corrupt-run-json"],
)
@pytest.mark.parametrize("command", ["eval", "generate", "merge-adapter"])
def test_corrupt_artifacts_are_named(setup, tmp_path, monkeypatch, breaks, named, command):
    """Named before any model loads: a recorder in place of transformers' from_pretrained sees no call for the
    broken run, and does see one for the intact run (so it is on the path ftune loads models by)."""
    from transformers import PreTrainedModel

    loads = []

    def record(cls, *args, **kwargs):
        loads.append(args[:1])
        raise RuntimeError("a model load, recorded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(record))
    broken = broken_copy(setup[1], tmp_path, breaks)
    args = {"eval": [], "generate": ["-p", "hi"], "merge-adapter": ["-o", str(tmp_path / "merged")]}[command]
    result = runner.invoke(app, [command, str(broken), *args])
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert line.startswith("error:") and named in line
    assert not (tmp_path / "merged").exists()
    assert loads == []
    runner.invoke(app, [command, str(setup[1]), *args])
    assert loads, "the recorder did not see the intact run's model load"


def test_unfinished_run_says_resume_it(setup, tmp_path):
    def interrupt(r):
        import shutil

        shutil.rmtree(r / "adapter")
        info = json.loads((r / "run.json").read_text())
        (r / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))

    broken = broken_copy(setup[1], tmp_path, interrupt)
    for command, args in (("generate", ["-p", "hi"]), ("eval", []), ("merge-adapter", ["-o", str(tmp_path / "m")])):
        result = runner.invoke(app, [command, str(broken), *args])
        assert result.exit_code == 2
        assert "did not finish (status interrupted)" in error_line(result) and "--resume" in error_line(result)


@pytest.mark.parametrize(
    "args, named",
    [
        (["generate", "RUN", "-p", "hi", "--do-sample", "--temperature", "0"], "--temperature"),
        (["generate", "RUN", "-p", "hi", "--top-p", "5"], "--top-p"),
        (["generate", "RUN", "-p", "hi", "--temperature", "nan"], "--temperature"),
        (["chat", "RUN", "--top-p", "0"], "--top-p"),
        (["merge-adapter", "RUN", "-o", "OUT", "--max-shard-size", "lots"], "--max-shard-size"),
        (["train", "RECIPE", "--samples", "-1"], "--samples"),
    ],
)
def test_bad_flags_refused_before_loading(setup, tmp_path, monkeypatch, args, named):
    from finetune_cli import models

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    recipe, run = setup
    swap = {"RUN": str(run), "OUT": str(tmp_path / "out"), "RECIPE": str(recipe)}
    result = runner.invoke(app, [swap.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert named in result.output and not (tmp_path / "out").exists()


def test_eval_json_keeps_one_result_per_data_set(setup):
    _, run = setup
    first = runner.invoke(app, ["eval", str(run), "--json"])
    second = runner.invoke(app, ["eval", str(run), "--json"])
    assert first.exit_code == 0 and second.exit_code == 0
    kept = json.loads((run / "eval.json").read_text())["evaluations"]
    assert len(kept) == 1 and kept[0] == json.loads(second.stdout)


@pytest.mark.parametrize(
    "change", ["training.optimizer=sgd", "training.lr_scheduler=linear", "training.weight_decay=0.1"]
)
def test_resume_refuses_what_the_checkpoint_fixes_even_with_force(interrupted, tmp_path, change):
    """The optimizer, the schedule's shape and weight decay live in the checkpoint's optimizer and scheduler state:
    changing any of them on resume is refused even with --force (a changed learning rate is applied:
    test_promises)."""
    out = copy_of(interrupted, tmp_path)
    before = snapshot(out)
    result = runner.invoke(app, ["train", str(out), "--resume", "--force", "--samples", "0", "--set", change])
    key = change.split("=")[0]
    assert result.exit_code == 2 and error_line(result).startswith(f"error: --resume: {key} cannot change"), (
        result.output
    )
    assert snapshot(out) == before


def test_completing_a_run_drops_only_its_checkpoint_folders(tmp_path):
    """A file put into checkpoints/ while a run trains (after its start was checked) outlives the run's end."""
    from finetune_cli import rundir

    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    (tmp_path / ".staging").mkdir()
    rundir.drop_checkpoints(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["notes.txt"]
    assert not (tmp_path / ".staging").exists()
    (tmp_path / "checkpoints" / "notes.txt").unlink()
    rundir.drop_checkpoints(tmp_path)  # nothing of the user's left: the folder goes too
    assert not (tmp_path / "checkpoints").exists()
