"""`training.precision: auto` (the default): what it resolves to on a CPU (native bf16 or not, FTUNE_CPU_BF16=1/0
overriding /proc/cpuinfo) and on a GPU, as run.json records it and as the training forward actually computes."""

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from finetune_cli import recipe as recipes
from finetune_cli.training import methods, train


class ForwardDtype(TrainerCallback):
    """Records, for every training forward of the first attention projection, the dtype its output has (bfloat16
    under bf16 autocast, float32 without) and whether CPU autocast was on."""

    def __init__(self):
        self.seen = set()

    def on_train_begin(self, args, state, control, model=None, **kw):
        layer = next(m for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))

        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                self.seen.add((output.dtype, torch.is_autocast_enabled("cpu")))

        layer.register_forward_hook(hook)


def cpu_bf16_flags() -> bool:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


@pytest.mark.parametrize("forced", ["1", "0", None])
def test_auto_precision_on_a_cpu_is_recorded_and_is_what_the_forward_runs_in(tiny_recipe, monkeypatch, forced):
    """FTUNE_CPU_BF16=1: bf16 in run.json, and the training forward computes in bfloat16 under CPU autocast; =0:
    fp32 and float32 without autocast; unset: bf16 exactly where /proc/cpuinfo lists AMX or AVX512-BF16. The
    weights stay float32 either way. A CPU run on every machine (CUDA hidden from torch on a GPU box)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if forced is None:
        monkeypatch.delenv("FTUNE_CPU_BF16", raising=False)
    else:
        monkeypatch.setenv("FTUNE_CPU_BF16", forced)
    bf16 = forced == "1" if forced is not None else cpu_bf16_flags()
    recorder = ForwardDtype()
    recipe = recipes.load(tiny_recipe, ["training.max_steps=1", "data.eval="])
    assert recipe.training.precision == "auto"
    summary = train.run(recipe, callbacks=[recorder], samples=0)
    info = json.loads((Path(recipe.output.dir) / "run.json").read_text())
    assert info["precision"] == summary["precision"] == ("bf16" if bf16 else "fp32")
    assert recorder.seen == {(torch.bfloat16, True) if bf16 else (torch.float32, False)}


def test_auto_precision_on_a_gpu_is_bf16_where_the_gpu_has_it(monkeypatch):
    """On a GPU the CPU's flags and FTUNE_CPU_BF16 do not matter: bf16 where the GPU supports it, else fp32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        for forced in ("1", "0"):
            monkeypatch.setenv("FTUNE_CPU_BF16", forced)
            assert methods.precision("auto") == ("bf16" if supported else "fp32")
    assert methods.precision("fp16") == "fp16" and methods.precision("fp32") == "fp32"
