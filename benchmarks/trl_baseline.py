"""The baseline: a plain TRL SFTTrainer script with TRL's defaults, as a user would write it.

It trains the same model with the same LoRA settings on the same tokenized examples (input_ids and labels: a
dataset that already has labels is used as is by TRL) for the same steps, batch and learning rate as the ftune
recipe it is compared with. Everything else is TRL's and transformers' default (bf16 autocast where TRL turns
it on, padded batches, random order, gradient checkpointing). Prints one JSON line: train seconds, final loss, peak
RSS, and the step-level figures of `profile_step.StepClock` (the same callback the ftune side runs with).

Run: python benchmarks/trl_baseline.py --model DIR --data tokenized.jsonl --batch-size 4 --grad-accum 2 ...
"""

import argparse
import json
import resource
import tempfile
import time

import datasets
import torch
from peft import LoraConfig
from profile_step import StepClock
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="JSONL with input_ids and labels")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fp32", action="store_true", help="bf16=False: the one change a CPU user may know to make")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--qlora", action="store_true", help="QLoRA: the model loaded in 4-bit nf4 (bitsandbytes)")
    p.add_argument("--profile-step", type=int, help="trace this step with torch.profiler")
    p.add_argument("--sync-step", type=int, help="count this step's host syncs (CUDA)")
    p.add_argument("--first-timed", type=int, default=5, help="the step-level figures leave out the steps before")
    args = p.parse_args()

    rows = [json.loads(line) for line in open(args.data)]
    dataset = datasets.Dataset.from_list(rows)
    quantization = None
    if args.qlora:  # the usual QLoRA script: nf4, double quantization, bf16 compute; TRL prepares the k-bit model
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            max_steps=args.steps,
            learning_rate=args.lr,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),  # on CPU TRL's default bf16=True refuses to start without it
            **({"bf16": False} if args.fp32 else {}),
        )
        peft = (
            None
            if args.full
            else LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM")
        )
        clock = StepClock(args.grad_accum, args.profile_step, args.sync_step)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft, callbacks=[clock])  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(
        json.dumps(
            {
                "train_seconds": seconds,
                "final_loss": losses[-1],
                "losses": losses,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                "bf16": config.bf16,
                "torch_threads": torch.get_num_threads(),
                "settings": {
                    "packing": config.packing,
                    "gradient_checkpointing": config.gradient_checkpointing,
                    "compile": config.torch_compile,
                },
                **clock.summary(args.first_timed),
            }
        )
    )


if __name__ == "__main__":
    main()
