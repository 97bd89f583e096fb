"""End to end: the real `ftune` command trains the builtin SmolLM2 on the shipped quickstart recipe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.slow
def test_quickstart_recipe_learns(quickstart_run, quickstart_merged, builtin_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, summary, stderr = quickstart_run  # the real `ftune train` of the shipped recipe (at fp32), shared
    ftune = Path(sys.executable).parent / "ftune"
    assert "Traceback" not in stderr
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["loss"] < 0.5 * before["loss"]  # the eval loss falls clearly
    assert summary["samples"][0]["tuned"].startswith('{"name": ')  # answers in the trained JSON shape

    # ftune eval --compare-base on the shipped eval data: the fine-tuned model has the lower perplexity
    out = subprocess.run([ftune, "eval", run, "--compare-base", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)["results"]
    assert results["tuned"]["perplexity"] < results["base"]["perplexity"]
    assert results["tuned"]["perplexity"] == pytest.approx(after["perplexity"], rel=1e-4)

    # ftune generate on the run shows the learned behaviour on a prompt from the shipped eval data
    first = json.loads((ROOT / "recipes" / "data" / "quickstart" / "eval.jsonl").read_text().splitlines()[3])
    system, user, answer = (m["content"] for m in first["messages"])
    out = subprocess.run([ftune, "generate", run, "--system", system, "-p", user], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == answer  # exactly the JSON record for this order

    # the merged model stops at the end-of-turn token instead of running to max_new_tokens (SmolLM2's EOS is
    # <|im_end|> already; test_export checks merge-adapter's rewrite with an EOS that differs from it)
    merged = quickstart_merged  # `ftune merge-adapter` of the run
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    prompt = tok.apply_chat_template(
        first["messages"][:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        new = model.generate(**prompt, max_new_tokens=120, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert len(new) < 120 and int(new[-1]) == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(new, skip_special_tokens=True).strip() == answer

    tok = AutoTokenizer.from_pretrained(run / "adapter")
    ids = tok("Order for Ana Ruiz: 2 x mug (red), deliver to Oslo, deadline Monday.", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(builtin_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned_logits = PeftModel.from_pretrained(base, run / "adapter")(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-2
