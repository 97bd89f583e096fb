"""`training.report_to`: one tiny run reports to TensorBoard, MLflow (a local file store) and wandb (offline) at once;
each tracker's own reader returns the losses metrics.jsonl holds; a missing tracker package is refused up front."""

import importlib.util
import json
import struct
import threading

import psutil
import pytest
from typer.testing import CliRunner

from finetune_cli import recipe as recipes
from finetune_cli.cli import app
from finetune_cli.errors import FtuneError

runner = CliRunner()


def write_recipe(folder, model_dir, report_to: str) -> object:
    from tests.conftest import conversation, write_jsonl

    write_jsonl(folder / "train.jsonl", [conversation(i) for i in range(8)])
    write_jsonl(folder / "eval.jsonl", [conversation(i + 100) for i in range(2)])
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"model:\n  base: {model_dir}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n  max_length: 64\n"
        "method:\n  r: 4\ntraining:\n  max_steps: 3\n  batch_size: 4\n  learning_rate: 1.0e-2\n  logging_steps: 1\n"
        f"  eval_steps: 2\n  save_steps: null\n  report_to: {report_to}\noutput:\n  dir: {folder / 'run'}\n"
    )
    return recipe


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir):
    """One 3-step run reporting to all three trackers (eval at steps 0, 2 and 3: the last one after training ends):
    metrics.jsonl's train losses and eval losses by step, and the child processes and threads left running once
    wandb's service is shut down."""
    import wandb

    folder = tmp_path_factory.mktemp("trackers")
    recipe = write_recipe(folder, tiny_model_dir, "[tensorboard, mlflow, wandb]")
    threads = set(threading.enumerate())
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"file://{folder / 'mlruns'}")
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind an opt-in
        for key, value in {"MODE": "offline", "DIR": str(folder), "SILENT": "true", "CONSOLE": "off"}.items():
            env.setenv(f"WANDB_{key}", value)
        env.setenv("WANDB_X_DISABLE_STATS", "true")  # no system metrics sampler
        try:
            result = runner.invoke(app, ["train", str(recipe), "--json"])
        finally:
            wandb.finish()  # transformers leaves the run open (wandb closes it at exit): flush the .wandb file
            wandb.teardown()  # and stop wandb's service process
    assert result.exit_code == 0, result.output
    processes = [p.name() for p in psutil.Process().children(recursive=True)]
    leftovers = processes + [t.name for t in set(threading.enumerate()) - threads if not t.daemon]
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(losses) == [1, 2, 3] and sorted(evals) == [0, 2, 3]
    return folder, losses, evals, leftovers


def test_trackers_leave_no_process_or_thread_running(tracked):
    assert tracked[3] == []  # an MLflow run left open (a second one, started after the first ended) keeps a thread


def test_tensorboard_reads_the_losses_from_the_run_folder(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, losses, evals, _ = tracked
    run = folder / "run"
    written = list(run.rglob("events.out.tfevents.*"))  # none under .staging/runs/, transformers' default
    assert written and {p.parent for p in written} == {run / "tensorboard"}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in ("train/loss", "eval/loss")}
    assert scalars["train/loss"] == pytest.approx(losses, rel=1e-6)  # TensorBoard keeps float32
    assert scalars["eval/loss"] == pytest.approx(evals, rel=1e-6)


def test_mlflow_file_store_holds_one_run_named_as_the_folder(tracked):
    from mlflow.tracking import MlflowClient

    folder, losses, evals, _ = tracked
    client = MlflowClient(tracking_uri=f"file://{folder / 'mlruns'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # the last eval reached the run before it ended, not a second run
    run = runs[0]
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert float(run.data.params["learning_rate"]) == 1.0e-2
    for key, expected in (("loss", losses), ("eval_loss", evals)):
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} == expected


def wandb_records(path):
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks, chunks with a 7-byte header: CRC, length,
    type) after wandb's 7-byte file header, each record a protobuf wandb_internal Record."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, records, pending, pos = path.read_bytes(), 32768, [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding at the end of the file
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(Record.FromString(pending))
            pending = b""
    return records


def test_wandb_offline_run_holds_the_losses(tracked):
    folder, losses, evals, _ = tracked
    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(path)
    names = [r.run.display_name for r in records if r.WhichOneof("record_type") == "run"]
    assert names and set(names) == {"run"}
    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    logged = {key: {h["train/global_step"]: h[key] for h in history if key in h} for key in ("train/loss", "eval/loss")}
    assert logged == {"train/loss": losses, "eval/loss": evals}


@pytest.mark.parametrize(
    "tracker, line",
    [
        (
            "tensorboard",
            "training.report_to: tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install 'ftune[tensorboard]')",
        ),
        (
            "mlflow",
            "training.report_to: mlflow needs the mlflow package: pip install mlflow-skinny "
            "(or pip install 'ftune[mlflow]')",
        ),
    ],
)
def test_a_missing_tracker_package_is_refused_before_the_run(tmp_path, tiny_model_dir, monkeypatch, tracker, line):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    recipe = write_recipe(tmp_path, tiny_model_dir, f"[wandb, {tracker}]")
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2 and line in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_an_mlflow_store_it_cannot_use_is_refused_before_the_run(tmp_path, tiny_model_dir, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_model_dir, "mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")  # MLflow 3 wants an opt-in
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert f"training.report_to: mlflow cannot use the tracking store file://{tmp_path}/mlruns" in result.output
    assert "MLFLOW_ALLOW_FILE_STORE=true" in result.output and not (tmp_path / "run").exists()


def test_report_to_names(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, "none")
    assert recipes.load(recipe).training.trackers() == []
    assert recipes.load(recipe, ["training.report_to=mlflow"]).training.trackers() == ["mlflow"]
    both = recipes.load(recipe, ["training.report_to=[tensorboard, mlflow]"])
    assert both.training.trackers() == ["tensorboard", "mlflow"]
    with pytest.raises(FtuneError, match=r"--set: 'training.report_to': 'tensorbord' .* did you mean 'tensorboard'"):
        recipes.load(recipe, ["training.report_to=[mlflow, tensorbord]"])
    text = recipe.read_text().replace("report_to: none", "report_to: wandbb")
    recipe.write_text(text)
    line = text.splitlines().index("  report_to: wandbb") + 1
    with pytest.raises(FtuneError, match=rf"recipe.yaml:{line}: 'training.report_to': 'wandbb' .* 'wandb'"):
        recipes.load(recipe)
