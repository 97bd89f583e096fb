"""Step-level measurement of a training run, the same code on both sides of a benchmark (issue 31).

`StepClock` is a TrainerCallback: at the end of every optimizer step it synchronizes CUDA and reads the clock,
so step k's time is from the end of step k-1 to the end of step k (loading, forward, backward, optimizer,
logging); it counts each micro-batch's tokens and learned tokens (labels other than -100, after the first
position) on the CPU as the collator builds it, keeps the logged loss of every step, and the peak memory at the
end of training (CUDA: the process's max allocated and max reserved; and its peak RSS). Optionally it traces one
step with torch.profiler (top kernels by CUDA time, or operators by CPU time on a CPU) and runs one step under
`torch.cuda.set_sync_debug_mode("warn")`, counting the host syncs and where they come from. The profiled and
sync-debug steps belong in the warm-up steps, which `summary` leaves out of the timed figures.

`benchmarks/trl_baseline.py` attaches it to the plain TRL script; run as a script, this file runs `ftune train`'s
own code (`finetune_cli.training.train.run`, what the CLI calls) with it attached:

    python benchmarks/profile_step.py RECIPE.yaml [--set training.packing=false ...] [--profile-step 3]
        [--sync-step 4] [--json OUT.json]

prints the profile table and the summary (JSON).
"""

import argparse
import json
import os
import resource
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

IGNORE = -100


class StepClock(TrainerCallback):
    def __init__(self, accumulation: int, profile_step: int | None = None, sync_step: int | None = None):
        self.accumulation, self.profile_step, self.sync_step = accumulation, profile_step, sync_step
        self.cuda = torch.cuda.is_available()
        self.ends: list[float] = []  # clock at the start of training, then at each step's end
        self.batches: list[tuple[int, list[int]]] = []  # per micro-batch, in the order built: learned, lengths
        self.losses: dict[int, float] = {}
        self.profiler = self.profile_table = self.caught = self.records = None
        self.syncs: Counter | None = None
        self.peak: dict = {}

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)  # accelerate wraps the DataLoader
        collate = loader.collate_fn

        def counting(features):
            learned = sum(int(np.count_nonzero(np.asarray(f["labels"][1:]) != IGNORE)) for f in features)
            self.batches.append((learned, [len(f["input_ids"]) for f in features]))
            return collate(features)

        loader.collate_fn = counting  # the epoch's iterator, made after this, takes the collator from here
        self._tick(0)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == self.sync_step:
            if self.cuda:
                torch.cuda.set_sync_debug_mode(0)
            self.caught.__exit__(None, None, None)
            self.syncs = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in self.records
                                 if "synchroniz" in str(w.message))  # fmt: skip
        if step == self.profile_step:
            self.profiler.__exit__(None, None, None)
            self.profile_table = self._table()
        self._tick(step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]

    def on_train_end(self, args, state, control, **kwargs):
        if self.cuda:
            mib = 2**20
            self.peak = {"allocated_mib": torch.cuda.max_memory_allocated() / mib,
                         "reserved_mib": torch.cuda.max_memory_reserved() / mib}  # fmt: skip
        self.peak["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _tick(self, step: int) -> None:
        """The clock at a step boundary (CUDA idle), then the next step's profiler / sync counting switched on."""
        if self.cuda:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if step + 1 == self.profile_step:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * self.cuda)
            self.profiler.__enter__()
        if step + 1 == self.sync_step:
            self.caught = warnings.catch_warnings(record=True)
            self.records = self.caught.__enter__()
            warnings.simplefilter("always")
            if self.cuda:
                torch.cuda.set_sync_debug_mode("warn")

    def _table(self, rows: int = 25) -> str:
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        return self.profiler.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)

    def summary(self, first_timed: int = 5) -> dict:
        """Figures of steps first_timed.. (the warm-up before them, compiling included, reported apart); the loss
        of every step from the first."""
        steps = len(self.ends) - 1
        a = self.accumulation
        timed = self.batches[(first_timed - 1) * a : steps * a]
        lengths = [n for _, batch in timed for n in batch]
        seconds = self.ends[-1] - self.ends[first_timed - 1] if steps >= first_timed else None
        learned = sum(x for x, _ in timed)
        return {
            "steps": steps,
            "first_timed_step": first_timed,
            "warmup_seconds": self.ends[min(first_timed - 1, steps)] - self.ends[0],
            "timed_seconds": seconds,
            "timed_learned_tokens": learned,
            "timed_tokens": sum(lengths),
            "timed_lengths": lengths,
            "learned_per_s": learned / seconds if seconds else None,
            "batch_learned": [x for x, _ in self.batches[: steps * a]],  # equal lists: the same data order
            "step_seconds": [round(b - e, 4) for e, b in zip(self.ends, self.ends[1:])],
            "losses": [self.losses.get(k) for k in range(1, steps + 1)],
            "peak": self.peak,
            "host_syncs": sum(self.syncs.values()) if self.syncs is not None and self.cuda else None,
            "sync_sites": dict(self.syncs.most_common(12)) if self.syncs else {},
            "profile": self.profile_table,
            "profile_step": self.profile_step,
            "sync_step": self.sync_step if self.cuda else None,
        }


def main() -> None:
    if "FTUNE_MALLOC" not in os.environ:  # as `ftune train` does: its malloc settings take a fresh interpreter
        from finetune_cli.cli import MALLOC_ENV

        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "FTUNE_MALLOC": "1", **MALLOC_ENV})
    p = argparse.ArgumentParser()
    p.add_argument("recipe", type=Path)
    p.add_argument("--set", action="append", default=[], dest="sets")
    p.add_argument("--profile-step", type=int, default=3)
    p.add_argument("--sync-step", type=int, default=4)
    p.add_argument("--first-timed", type=int, default=5)
    p.add_argument("--json", type=Path, help="write the summary here")
    args = p.parse_args()
    from finetune_cli import rundir
    from finetune_cli.training import train, trainer

    recipe = rundir.load_recipe(args.recipe, args.sets, False)
    clock = StepClock(recipe.training.gradient_accumulation, args.profile_step, args.sync_step)
    result = train.run(recipe, overwrite=True, callbacks=[clock], samples=0)
    t = recipe.training
    settings = {"packing": trainer.packing_applies(recipe), "micro_batch_tokens": trainer.micro_batch_tokens(recipe),
                "gradient_checkpointing": t.gradient_checkpointing, "compile": t.compile,
                "precision": str(result.get("precision"))}  # fmt: skip
    out = {**clock.summary(args.first_timed), "settings": settings, "train_seconds": result["train_seconds"],
           "final_loss": result["final_loss"]}  # fmt: skip
    if out["profile"]:
        print(out["profile"])
    text = json.dumps(out)
    args.json.write_text(text) if args.json else print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
