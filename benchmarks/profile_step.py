"""Where a training step's time goes: torch.profiler over a few optimizer steps of `ftune train`'s own trainer
(the benchmark's mixed-length data, builtin SmolLM2, LoRA), top operators by self CPU time.

Run: python benchmarks/profile_step.py DATA.jsonl [--set training.packing=false ...] [--steps 2]
"""

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from finetune_cli import models
from finetune_cli import recipe as recipes
from finetune_cli import trainer as trainers
from finetune_cli.data import jsonl
from finetune_cli.data.masking import tokenize_all


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ftune-profile-"))
    path = folder / "r.yaml"
    path.write_text(
        f"data:\n  train: {args.data}\n  cache: false\nmethod:\n  name: lora\ntraining:\n  batch_size: 4\n"
        f"  gradient_accumulation: 2\n  max_steps: {args.steps + 1}\n  save_steps: null\n"
        f"output:\n  dir: {folder / 'run'}\n"
    )
    recipe = recipes.load(path, args.sets)
    source = models.resolve(recipe.model.base)
    tokenizer = models.load_tokenizer(source)
    examples, _ = tokenize_all(tokenizer, jsonl.read(args.data), recipe.data.max_length, "assistant")
    model = models.load_model(source)
    trainer = trainers.build(recipe, source, model, tokenizer, examples, folder / "run", [])

    from transformers import TrainerCallback

    class Profile(TrainerCallback):  # skip the first (warm-up) step, record the rest
        def on_step_end(self, args_, state, control, **kw):
            if state.global_step == 1:
                self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
                self.prof.__enter__()

        def on_train_end(self, args_, state, control, **kw):
            self.prof.__exit__(None, None, None)

    cb = Profile()
    trainer.add_callback(cb)
    trainer.train()
    print(cb.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48))
    print("threads", torch.get_num_threads())


if __name__ == "__main__":
    main()
