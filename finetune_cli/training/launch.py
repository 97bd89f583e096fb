"""Distributed runs: start `ftune train` on N processes through `accelerate launch`, or run as one rank of a
launcher that started us (accelerate launch, torchrun). DDP, FSDP and DeepSpeed are accelerate's; ftune only
chooses the preset, checks what cannot work before launching, and keeps every write on the main process."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from finetune_cli.errors import FtuneError

PRESETS = Path(__file__).resolve().parent / "presets"
SHARDED = ("fsdp", "deepspeed-zero3")  # strategies whose processes each hold a shard of the weights


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """The process that prints and writes: rank 0, or the only one."""
    return rank() == 0


def launched() -> bool:
    """Started by a launcher (accelerate launch, torchrun): run as one rank, never launch again."""
    return "WORLD_SIZE" in os.environ or "ACCELERATE_USE_CPU" in os.environ


def launcher_strategy() -> str:
    """The strategy the launcher set up for this process (accelerate passes it in the environment; torchrun: DDP)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")  # unset when the stage is in a JSON file
        return f"deepspeed-zero{stage}" if stage else "deepspeed"
    return "ddp"


def check_rank(recipe) -> str:
    """This process's strategy; a sharded recipe under a launcher that set up plain DDP is refused."""
    if not launched():
        return "ddp"
    strategy = launcher_strategy()
    wanted_strategy = recipe.distributed.strategy
    if recipe.distributed.config is None and wanted_strategy != "ddp" and strategy == "ddp":
        raise FtuneError(
            f"distributed.strategy is {wanted_strategy} but the launcher that started this process set up DDP "
            f"(torchrun always does); start it with `ftune train RECIPE`, which launches accelerate with the "
            f"{wanted_strategy} preset, or with `accelerate launch --config_file YOUR_CONFIG -m finetune_cli train`"
        )
    return strategy


def wanted(recipe) -> bool:
    """Whether this `ftune train` must start the run through accelerate launch."""
    d = recipe.distributed
    return not launched() and (d.num_processes > 1 or d.num_machines > 1 or d.strategy != "ddp" or bool(d.config))


def check(recipe) -> None:
    """Refuse, before launching, what cannot work; the message says what to change."""
    d, method = recipe.distributed, recipe.method
    import torch

    cuda = torch.cuda.is_available()
    per_node = d.num_processes // d.num_machines
    if cuda and per_node > torch.cuda.device_count():
        raise FtuneError(
            f"distributed.num_processes: {per_node} processes per machine but this machine has "
            f"{torch.cuda.device_count()} GPU(s); use at most one process per GPU"
        )
    if d.config:  # the user's own accelerate config: accelerate checks its contents
        if not Path(d.config).is_file():
            raise FtuneError(f"distributed.config: {d.config} not found; give your accelerate config file's path")
        return
    if d.strategy.startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise FtuneError(
                f"distributed.strategy: {d.strategy} needs DeepSpeed, which is not installed; "
                "pip install deepspeed, or use strategy ddp or fsdp"
            )
        if not cuda:
            raise FtuneError(f"distributed.strategy: {d.strategy} needs CUDA GPUs; use strategy ddp on CPU")
    if d.strategy == "fsdp" and method.name == "qlora":
        if method.bits == 8:
            raise FtuneError(
                "distributed.strategy: fsdp cannot shard 8-bit weights; use method.bits: 4 (QLoRA), "
                "or strategy ddp / deepspeed-zero2"
            )
        if not cuda:
            raise FtuneError("distributed.strategy: fsdp with QLoRA needs CUDA GPUs; use strategy ddp on CPU")
    if d.strategy == "deepspeed-zero3" and method.name == "qlora" and method.bits == 8:
        raise FtuneError("distributed.strategy: deepspeed-zero3 cannot shard 8-bit weights; use method.bits: 4")


def preset(recipe) -> Path:
    """The accelerate config file shipped for the recipe's strategy (QLoRA under FSDP has its own)."""
    name = recipe.distributed.strategy
    if name == "fsdp" and recipe.method.name == "qlora":
        name = "fsdp-qlora"
    return PRESETS / f"{name}.yaml"


def mixed_precision(precision: str) -> str:
    """accelerate's name for training.precision (auto resolved as training resolves it)."""
    from finetune_cli.training.methods import precision as resolve

    resolved = resolve(precision)
    return "no" if resolved == "fp32" else resolved


def command(recipe, ftune_args: list[str]) -> list[str]:
    """The `accelerate launch` command line that runs `python -m finetune_cli <ftune_args>` on every process."""
    d = recipe.distributed
    cmd = [sys.executable, "-m", "finetune_cli.training.launch"]
    if d.config:
        cmd += ["--config_file", d.config]
    else:
        cmd += ["--config_file", str(preset(recipe))]
        if d.strategy.startswith("deepspeed"):
            cmd += ["--deepspeed_config_file", str(PRESETS / f"zero{d.strategy[-1]}.json")]
        else:
            cmd += ["--mixed_precision", mixed_precision(recipe.training.precision)]
    cmd += ["--num_processes", str(d.num_processes), "--num_machines", str(d.num_machines)]
    cmd += ["--machine_rank", str(d.machine_rank), "--main_process_port", str(d.main_process_port)]
    if d.main_process_ip:
        cmd += ["--main_process_ip", d.main_process_ip]
    cmd += ["--dynamo_backend", "no", "-m", "finetune_cli", *ftune_args]
    return cmd


def relaunch_args(
    target: str,
    overrides: list[str],
    samples: int,
    overwrite: bool,
    resume: bool,
    force: bool,
    as_json: bool,
    debug: bool,
) -> list[str]:
    """The `ftune` arguments each rank runs: the same train command as the user's, as one rank."""
    flags = [f"--set={o}" for o in overrides] + [f"--samples={samples}"]
    flags += [f for f, on in (("--overwrite", overwrite), ("--resume", resume), ("--force", force)) if on]
    return ["--debug"] * debug + ["train", target, *flags] + ["--json"] * as_json


def launch(recipe, ftune_args: list[str], debug: bool = False) -> int:
    """Run accelerate launch and return the run's exit code: the first failing rank's (2 bad input, 1 failed,
    130 interrupted), 0 when all ranks finished. The ranks write to this terminal directly."""
    env = {**os.environ, "FTUNE_LAUNCHER_DEBUG": "1" if debug else ""}
    if recipe.distributed.num_processes > 1 and "OMP_NUM_THREADS" not in env:  # else torchrun sets 1 per process
        per_node = max(1, recipe.distributed.num_processes // recipe.distributed.num_machines)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // per_node))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the ranks, which checkpoint
    try:
        return subprocess.run(command(recipe, ftune_args), env=env).returncode
    finally:
        signal.signal(signal.SIGINT, previous)


def _agent(argv: list[str]) -> int:
    """`python -m finetune_cli.training.launch ACCELERATE_LAUNCH_ARGS`: accelerate's own launch command, with a rank's
    failure turned into that rank's exit code instead of the agent's traceback (shown with --debug)."""
    import logging

    from accelerate.commands.launch import launch_command, launch_command_parser

    debug = os.environ.pop("FTUNE_LAUNCHER_DEBUG", "") == "1"
    if not debug:
        logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except subprocess.CalledProcessError as exc:  # single-process launchers
        return _shell_code(exc.returncode)
    except Exception as exc:  # noqa: BLE001
        failure = getattr(exc, "get_first_failure", None)
        if failure is None or debug:
            raise
        return _shell_code(failure()[1].exitcode)
    return 0


def _shell_code(code: int) -> int:
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


@contextmanager
def local_main_first():
    """Run the block on each machine's main process first, then on the others (which then read its cache)."""
    if world_size() == 1:
        yield
        return
    import torch.distributed as dist

    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        dist.barrier()
    try:
        yield
    finally:
        if first:
            dist.barrier()


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def init(cuda: bool) -> None:
    """Join the launcher's process group (gloo on CPU, nccl on GPUs) before the first barrier."""
    if world_size() == 1:
        return
    from accelerate import PartialState

    PartialState(cpu=not cuda)


def any_rank(value: str | None) -> str | None:
    """`value` if it is set on this rank, else the first rank's that has one (None if no rank has one)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if value else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return value or ("a signal on another rank" if flag.item() else None)


if __name__ == "__main__":
    sys.exit(_agent(sys.argv[1:]))
