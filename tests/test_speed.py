"""Speed switches change speed only: padding-free packing computes the same per-example losses as unpacked
training (checked against plain transformers, one example at a time), and neither packing nor length grouping
changes which examples an epoch sees or their masks. Also: `ftune --help` and `ftune validate` stay
torch-free."""

import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from finetune_cli import hardware, models
from finetune_cli import recipe as recipes
from finetune_cli.data import jsonl
from finetune_cli.data.masking import IGNORE, tokenize_all
from finetune_cli.training import trainer as trainers
from finetune_cli.training.microbatch import resolve, split
from tests.conftest import conversation, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("speed")
    # lengths from one exchange to four: packing and grouping have something to do
    write_jsonl(folder / "train.jsonl", [conversation(i, system=i % 2 == 0, turns=1 + i % 4) for i in range(24)])
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    examples, _ = tokenize_all(tokenizer, jsonl.read(folder / "train.jsonl"), 256, "assistant")
    return folder, tokenizer, examples


def trainer_for(setup, tiny_model_dir, tmp_path, **training):
    """The trainer ftune builds for these examples, at fp32 on every CPU: the tests compare packed and unpacked,
    whole and split computations at float32 tolerances."""
    folder, tokenizer, examples = setup
    recipe = recipes.Recipe.model_validate(
        {
            "model": {"base": str(tiny_model_dir)},
            "data": {"train": str(folder / "train.jsonl")},
            "method": {"name": "lora", "r": 4, "dropout": 0.0},
            "training": {"batch_size": 4, "gradient_accumulation": 2, "epochs": 1, "precision": "fp32", **training},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    model = models.load_model(str(tiny_model_dir))
    return trainers.build(recipe, str(tiny_model_dir), model, tokenizer, examples, tmp_path / "run", [])


def epoch(trainer) -> list[dict]:
    """The examples one epoch hands to the model, each as (input_ids, labels[1:]), unpacking packed rows."""
    seen = []
    for batch in trainer.get_train_dataloader():
        if "position_ids" in batch and "attention_mask" not in batch:  # padding-free: one row, restarts at 0
            ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
            starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                seen.append((tuple(ids[a:b].tolist()), tuple(labels[a + 1 : b].tolist())))
        else:
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
                n = int(mask.sum())
                seen.append((tuple(ids[:n].tolist()), tuple(labels[1:n].tolist())))
    return seen


def as_counter(examples) -> Counter:
    return Counter((tuple(e["input_ids"]), tuple(e["labels"][1:])) for e in examples)


@pytest.mark.parametrize("packing,grouping", [(False, False), (True, False), (False, True), (True, True)])
def test_packing_and_grouping_keep_the_epoch_and_its_masks(setup, tiny_model_dir, tmp_path, packing, grouping):
    trainer = trainer_for(setup, tiny_model_dir, tmp_path, packing=packing, group_by_length=grouping)
    assert Counter(epoch(trainer)) == as_counter(setup[2])


def test_length_grouping_reduces_padding(setup, tiny_model_dir, tmp_path):
    def padded(trainer):
        return sum(b["input_ids"].numel() for b in trainer.get_train_dataloader())

    plain = trainer_for(setup, tiny_model_dir, tmp_path, packing=False)
    grouped = trainer_for(setup, tiny_model_dir, tmp_path, packing=False, group_by_length=True)
    packed = trainer_for(setup, tiny_model_dir, tmp_path, packing=True)
    total = sum(len(e["input_ids"]) for e in setup[2])
    assert padded(packed) == total < padded(grouped) < padded(plain)


def test_packed_losses_equal_unpacked_per_example(setup, tiny_model_dir, tmp_path):
    """Every example's summed NLL from a packed row equals the same example scored alone by plain transformers
    (tolerance 1e-4 relative, float32: only the attention kernel's summation order differs), and the trainer's
    loss on the packed batch equals total NLL / learned tokens of the unpacked examples."""
    from transformers import AutoModelForCausalLM

    trainer = trainer_for(setup, tiny_model_dir, tmp_path, packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.eval()
    # LoRA B starts at 0: the same function (on the trainer's device: a GPU where there is one)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(model.device).eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        pos = batch["position_ids"][0]
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        total_nll, total_n = 0.0, 0
        for a, b in zip(starts, starts[1:]):
            ids, labels = batch["input_ids"][0, a:b], batch["labels"][0, a + 1 : b]
            packed = F.cross_entropy(logits[a : b - 1], labels, ignore_index=IGNORE, reduction="sum")
            alone = plain(ids[None]).logits[0, :-1]
            reference = F.cross_entropy(alone, labels, ignore_index=IGNORE, reduction="sum")
            assert float(packed) == pytest.approx(float(reference), rel=1e-4)
            total_nll += float(reference)
            total_n += int((labels != IGNORE).sum())
        assert len(starts) - 1 == 4  # the four examples of one micro-batch
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(total_n))
    assert float(loss) == pytest.approx(total_nll / total_n, rel=1e-4)


def test_prompt_tuning_is_never_packed(setup, tiny_model_dir, tmp_path):
    """Prompt tuning prepends virtual tokens to each row: a packed row would share one prefix, so it stays padded."""
    folder, tokenizer, examples = setup
    recipe = recipes.Recipe.model_validate(
        {
            "model": {"base": str(tiny_model_dir)},
            "data": {"train": str(folder / "train.jsonl")},
            "method": {"name": "prompt_tuning", "num_virtual_tokens": 4},
            "training": {"batch_size": 4, "packing": True},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    model = models.load_model(str(tiny_model_dir))
    trainer = trainers.build(recipe, str(tiny_model_dir), model, tokenizer, examples, tmp_path / "run", [])
    assert "attention_mask" in next(iter(trainer.get_train_dataloader()))


def test_help_and_validate_do_not_import_torch(tmp_path, tiny_recipe, builtin_dir):
    probe = (
        "import sys\nfrom typer.testing import CliRunner\nfrom finetune_cli.cli import app\n"
        "r = CliRunner().invoke(app, sys.argv[1:])\nassert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)\n"
    )
    for args in (["--help"], ["validate", str(tiny_recipe)]):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == "False", args


def test_micro_batch_split_partitions_the_row_into_whole_examples(setup, tiny_model_dir, tmp_path):
    trainer = trainer_for(setup, tiny_model_dir, tmp_path, packing=True)
    for batch in trainer.get_train_dataloader():
        lengths = batch["cu_seq_lens_q"].diff().tolist()
        budget = max(lengths) - 1  # the longest example runs alone, over the budget
        parts = split(batch, budget)
        assert len(parts) > 1
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(torch.cat([p[key] for p in parts], dim=1), batch[key]), key
        before = [0] + [len(p["cu_seq_lens_q"]) - 1 for p in parts][:-1]  # each part counts its examples from 0
        seq_idx = torch.cat([p["seq_idx"] + sum(before[: i + 1]) for i, p in enumerate(parts)], dim=1)
        assert torch.equal(seq_idx, batch["seq_idx"])
        assert sum(len(p["cu_seq_lens_q"]) - 1 for p in parts) == len(lengths)
        for p in parts:
            n = p["input_ids"].shape[1]
            own = p["cu_seq_lens_q"].diff().tolist()
            assert p["cu_seq_lens_q"][0] == 0 and p["cu_seq_lens_q"][-1] == n and p["max_length_q"] == max(own)
            assert torch.equal(p["cu_seq_lens_k"], p["cu_seq_lens_q"])
            assert p["position_ids"][0, 0] == 0 and p["seq_idx"][0, 0] == 0
            assert n <= budget or len(own) == 1
        assert split(batch, sum(lengths)) == [batch]  # a row that fits stays whole
        assert split(batch, None) == [batch]


def test_micro_batch_tokens_change_memory_not_gradients(setup, tiny_model_dir, tmp_path):
    """One packed micro-batch run whole and as sub-rows of at most 64 tokens: the same loss and the same
    gradient on every trainable parameter (float32; only summation order differs), since each pass is
    normalised by the step's learned-token count, not its own."""
    grads, losses = [], []
    for budget in (None, 64):
        torch.manual_seed(0)
        trainer = trainer_for(setup, tiny_model_dir, tmp_path, packing=True, micro_batch_tokens=budget)
        with torch.no_grad():  # LoRA B starts at zero: give it values so every gradient is non-trivial
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
        batch = next(iter(trainer.get_train_dataloader()))
        n = (batch["labels"][:, 1:] != IGNORE).sum()
        trainer.create_optimizer()
        trainer.model.zero_grad()
        losses.append(float(trainer.training_step(trainer.model, dict(batch), num_items_in_batch=n)))
        grads.append({k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.requires_grad})
    assert len(split(batch, 64)) >= 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert grads[0][k].abs().sum() > 0, k
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-7)


def test_micro_batch_tokens_setting(setup, tiny_model_dir, tmp_path):
    assert resolve("auto", cuda=False) == 512 and resolve("auto", cuda=True) is None and resolve(128, True) == 128
    folder = setup[0]

    def recipe(**training):
        return recipes.Recipe.model_validate(
            {"data": {"train": str(folder / "train.jsonl")}, "training": training, "output": {"dir": str(tmp_path)}}
        )

    assert trainers.micro_batch_tokens(recipe()) == (None if torch.cuda.is_available() else 512)
    assert trainers.micro_batch_tokens(recipe(packing=False, micro_batch_tokens=100)) is None
    assert trainers.micro_batch_tokens(recipe(micro_batch_tokens=None)) is None
    with pytest.raises(ValueError):
        recipe(micro_batch_tokens=0)


def test_packing_auto_packs_on_cpu_and_pads_on_gpus(setup, tiny_model_dir, tmp_path, monkeypatch):
    """`training.packing: auto` (the default): packed rows on CPU, padded batches where CUDA is (measured faster
    on an H200 without flash-attn); an explicit true or false is obeyed everywhere; a run recorded with
    `packing: true` before `auto` existed resumes without a recipe change where auto means true."""
    import yaml

    from finetune_cli import rundir

    folder = setup[0]
    recipe = recipes.Recipe.model_validate({"model": {"base": str(tiny_model_dir)},
                                            "data": {"train": str(folder / "train.jsonl")}})  # fmt: skip
    assert recipe.training.packing == "auto"
    monkeypatch.setattr(hardware, "cuda", lambda: False)  # a CPU machine, also on a GPU box
    assert trainers.packing_applies(recipe)
    assert "position_ids" in next(iter(trainer_for(setup, tiny_model_dir, tmp_path).get_train_dataloader()))
    old = recipe.model_dump(mode="json")
    old["training"]["packing"] = True
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old))
    assert rundir.recipe_changes(tmp_path, recipe.model_dump(mode="json")) == []

    monkeypatch.setattr(hardware, "cuda", lambda: True)
    assert not trainers.packing_applies(recipe)
    assert rundir.recipe_changes(tmp_path, recipe.model_dump(mode="json")) == ["training.packing"]
    forced = recipe.model_copy(update={"training": recipe.training.model_copy(update={"packing": True})})
    assert trainers.packing_applies(forced)


def test_packed_attention_reads_the_example_bounds_once_per_forward(setup, tiny_model_dir, tmp_path, monkeypatch):
    """Each read of the bounds tensor waits for a GPU; every layer of a forward gets the same tensor, so it is read
    once a forward (the GPU check measured packed rows at half TRL's speed when each layer read it)."""
    from finetune_cli.training import attention

    reads = []
    original = attention._to_list
    monkeypatch.setattr(attention, "_to_list", lambda bounds: reads.append(1) or original(bounds))
    trainer = trainer_for(setup, tiny_model_dir, tmp_path, packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer.model.config.num_hidden_layers > 1
    with torch.no_grad():
        trainer.model(**{k: v for k, v in batch.items() if k != "labels"})
        assert len(reads) == 1
        trainer.model(**{k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"})
    assert len(reads) == 2
