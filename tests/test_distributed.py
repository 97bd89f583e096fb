"""Distributed training through accelerate, on CPU (gloo): two processes train like one with twice the batch,
only rank 0 writes, torchrun and --num-processes agree, FSDP writes the whole adapter, presets load in
accelerate, and what cannot work is refused before any process starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune_cli import recipe as recipes
from finetune_cli.cli import app
from finetune_cli.training import launch
from tests.conftest import conversation, write_jsonl

FTUNE = Path(sys.executable).parent / "ftune"
STEPS = 4


def free_port() -> int:
    """A TCP port nobody listens on now: test runs side by side on one machine must not meet at 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ftune(*args, **kw):
    return subprocess.run([FTUNE, *map(str, args)], capture_output=True, text=True, timeout=400, **kw)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_model_dir) -> Path:
    """16 conversations of mixed length, 4 steps of 4 sequences: exactly one epoch. LoRA dropout 0 so that the
    runs compared below differ only in how the batch is split, not in random dropout masks. Precision fp32 on
    every CPU: these tests are about how work is split across processes, compared at float32 tolerances (with
    `precision: auto`, a CPU with native bf16 would train under bf16 autocast)."""
    folder = tmp_path_factory.mktemp("distributed")
    write_jsonl(folder / "train.jsonl", [conversation(i, turns=1 + i % 3) for i in range(16)])
    write_jsonl(folder / "eval.jsonl", [conversation(i + 100) for i in range(4)])
    path = folder / "recipe.yaml"
    path.write_text(
        f"model:\n  base: {tiny_model_dir}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n  max_length: 128\n"
        "method:\n  name: lora\n  r: 8\n  dropout: 0.0\n"
        f"training:\n  max_steps: {STEPS}\n  batch_size: 2\n  learning_rate: 1.0e-2\n  save_steps: 2\n"
        f"  precision: fp32\ndistributed:\n  main_process_port: {free_port()}\noutput:\n  dir: {folder / 'unused'}\n"
    )
    return path


@pytest.fixture(scope="module")
def two_processes(recipe_file):
    out_dir = recipe_file.parent / "ddp"
    # each rank runs its packed row of 2 examples as passes of one example (all are over 32 tokens): the
    # passes before the last skip DDP's all-reduce
    sets = ["--set", f"output.dir={out_dir}", "--set", "training.micro_batch_tokens=32"]
    out = ftune("train", recipe_file, "--num-processes", 2, "--samples", 0, *sets)
    assert out.returncode == 0, out.stderr
    return out_dir, out


@pytest.fixture(scope="module")
def one_process(recipe_file):
    out_dir = recipe_file.parent / "single"
    sets = [
        "--set",
        f"output.dir={out_dir}",
        "--set",
        "training.batch_size=4",
        "--set",
        "training.micro_batch_tokens=null",
    ]
    out = ftune("train", recipe_file, "--samples", 0, *sets)
    assert out.returncode == 0, out.stderr
    return out_dir


def steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_write_one_run_that_plain_peft_loads(two_processes, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, out = two_processes
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [".ftune", "adapter", "loss.png", "metrics.jsonl", "recipe.yaml", "report.html", "run.json"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == STEPS
    assert info["distributed"] == {
        "processes": 2,
        "strategy": "ddp",
        "effective_batch_size": 4,
        "micro_batch_tokens": 32,
    }
    # one epoch of 4 steps x 4 sequences: the two ranks together saw all 16 examples' tokens, each once
    assert [r["epoch"] for r in steps(run_dir)] == [0.25, 0.5, 0.75, 1.0]
    counts = [len(e) for e in _token_counts(run_dir)]
    assert info["tokens_seen"] == sum(counts) and min(counts) > 32
    # rank 0 alone prints: one summary, one effective-batch line
    assert out.stderr.count("sequences per step") == 1 and out.stderr.count("ftune train") == 1
    assert "2 per device x 1 accumulation x 2 processes = 4 sequences per step" in out.stderr
    assert not list(run_dir.glob("checkpoints")) and [p.name for p in run_dir.glob(".*")] == [".ftune"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter")
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def _token_counts(run_dir: Path) -> list[list[int]]:
    """The training examples' token ids, tokenized independently of ftune: each line of the data file through the
    tokenizer's own chat template, truncated to the recipe's data.max_length (the longest here fits anyway)."""
    import yaml
    from transformers import AutoTokenizer

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    tok = AutoTokenizer.from_pretrained(recipe["model"]["base"])
    max_length = recipe["data"]["max_length"]
    out = []
    for line in Path(recipe["data"]["train"]).read_text().splitlines():
        ids = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert len(ids) <= max_length
        out.append(ids[:max_length])
    return out


@pytest.mark.slow
def test_two_processes_match_one_process_with_twice_the_batch(two_processes, one_process):
    """Tolerance 1e-4 relative. Why it should be tiny: with the same seed both runs draw the same 4 examples per
    step (rank 0 takes the first 2, rank 1 the next 2), transformers normalises the loss by the learned tokens
    of the whole global batch (all-reduced), and DDP averages gradients (the two-process run also splits each
    rank's row into one pass per example, the single process runs its row whole); what remains is float32 summation
    order (measured: equal to 1e-6). Different examples per rank, or each rank seeing the same ones, would
    change the loss from step 1 by far more."""
    two, one = steps(two_processes[0]), steps(one_process)
    assert len(two) == len(one) == STEPS
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    a = load_file(two_processes[0] / "adapter" / "adapter_model.safetensors")
    b = load_file(one_process / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_torchrun_runs_each_process_as_one_rank(two_processes, recipe_file):
    out_dir = recipe_file.parent / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += ["-m", "finetune_cli", "train", str(recipe_file), "--samples", "0", "--set", f"output.dir={out_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr
    assert "launching" not in out.stderr  # it did not launch again
    assert out.stderr.count("ftune train") == 1
    info = json.loads((out_dir / "run.json").read_text())
    assert info["distributed"] == {
        "processes": 2,
        "strategy": "ddp",
        "effective_batch_size": 4,
        "micro_batch_tokens": 512,
    }
    for a, b in zip(steps(out_dir), steps(two_processes[0]), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.slow
def test_fsdp_writes_the_whole_adapter(two_processes, recipe_file):
    """Under FSDP each rank holds half of every weight; the saved adapter must be whole and equal DDP's."""
    out_dir = recipe_file.parent / "fsdp"
    out = ftune(
        "train", recipe_file, "--num-processes", 2, "--samples", 0,
        "--set", f"output.dir={out_dir}", "--set", "distributed.strategy=fsdp",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads((out_dir / "run.json").read_text())["distributed"]["strategy"] == "fsdp"
    a = load_file(out_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(two_processes[0] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_a_failing_rank_exits_with_its_code_and_no_traceback(recipe_file, tmp_path):
    """A failure inside the ranks (a learning rate that makes the loss infinite) surfaces as the ranks' exit
    code and their one error line, without the launcher's traceback."""
    out = ftune(
        "train", recipe_file, "--num-processes", 2, "--samples", 0,
        "--set", f"output.dir={tmp_path / 'nan'}",
        "--set", "training.learning_rate=1e30", "--set", "training.max_steps=3",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr
    assert "error: training loss became" in out.stderr
    assert json.loads((tmp_path / "nan" / "run.json").read_text())["status"] == "failed"


def _refused(monkeypatch, tmp_path, recipe_file, *sets, cuda=False, gpus=0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("launched"))
    args = ["train", str(recipe_file), "--set", f"output.dir={tmp_path / 'run'}"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "run").exists()
    return result.output


def test_more_processes_than_gpus_is_refused_before_launching(monkeypatch, tmp_path, recipe_file):
    out = _refused(monkeypatch, tmp_path, recipe_file, "distributed.num_processes=4", cuda=True, gpus=2)
    assert "4 processes per machine but this machine has 2 GPU(s)" in out


def test_deepspeed_missing_is_refused_before_launching(monkeypatch, tmp_path, recipe_file):
    if launch.importlib.util.find_spec("deepspeed"):
        pytest.skip("deepspeed is installed here")
    out = _refused(monkeypatch, tmp_path, recipe_file, "distributed.strategy=deepspeed-zero2", cuda=True, gpus=2)
    assert "needs DeepSpeed, which is not installed; pip install deepspeed" in out


def test_strategy_that_does_not_fit_the_method_is_refused(monkeypatch, tmp_path, recipe_file):
    out = _refused(
        monkeypatch, tmp_path, recipe_file, "distributed.strategy=fsdp", "method.name=qlora", "method.bits=8",
        cuda=True, gpus=2,
    )  # fmt: skip
    assert "fsdp cannot shard 8-bit weights" in out
    out = _refused(monkeypatch, tmp_path, recipe_file, "distributed.strategy=fsdp", "method.name=qlora")
    assert "fsdp with QLoRA needs CUDA GPUs" in out


def test_sharded_strategy_under_torchrun_is_refused(monkeypatch, tmp_path, recipe_file):
    monkeypatch.setenv("WORLD_SIZE", "1")  # as torchrun would set it (one rank, so nothing waits on us)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    out = _refused(monkeypatch, tmp_path, recipe_file, "distributed.strategy=fsdp")
    assert "the launcher that started this process set up DDP" in out


def test_multi_machine_settings_are_checked(tmp_path, recipe_file):
    result = CliRunner().invoke(
        app, ["train", str(recipe_file), "--set", "distributed.num_machines=2", "--set", "distributed.num_processes=4"]
    )
    assert result.exit_code == 2 and "main_process_ip" in result.output


@pytest.mark.parametrize(
    "strategy,method,kind",
    [
        ("ddp", "lora", "MULTI_GPU"),
        ("fsdp", "lora", "FSDP"),
        ("fsdp", "qlora", "FSDP"),
        ("deepspeed-zero2", "lora", "DEEPSPEED"),
        ("deepspeed-zero3", "full", "DEEPSPEED"),
    ],
)
def test_presets_are_accepted_by_accelerate(strategy, method, kind):
    """The exact command ftune runs, parsed and validated by accelerate's own launch code (no process starts)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    recipe = recipes.Recipe.model_validate(
        {
            "data": {"train": "x.jsonl"},
            "method": {"name": method},
            "distributed": {"num_processes": 4, "num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1"},
        }
    )
    recipe.distributed.strategy = strategy
    cmd = launch.command(recipe, ["train", "recipe.yaml"])
    assert cmd[1:3] == ["-m", "finetune_cli.training.launch"] and cmd[-4:] == [
        "-m",
        "finetune_cli",
        "train",
        "recipe.yaml",
    ]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    assert defaults.distributed_type.name == kind
    assert (args.num_processes, args.num_machines, args.machine_rank) == (4, 2, 1)
    assert args.main_process_ip == "10.0.0.1" and args.main_process_port == 29500
    if kind == "FSDP":
        assert args.fsdp_state_dict_type == "FULL_STATE_DICT"  # the whole adapter is written, not a shard
        if method == "qlora":
            assert str(args.fsdp_version) == "1" and str(args.fsdp_use_orig_params).lower() == "false"
    if kind == "DEEPSPEED":
        ds = HfDeepSpeedConfig(args.deepspeed_config_file)
        assert ds.get_value("zero_optimization.stage") == int(strategy[-1])
        if strategy.endswith("3"):
            assert ds.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True
