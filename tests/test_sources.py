"""Data sources: the same conversations from JSONL, JSON, Parquet, CSV, save_to_disk folders, folders of files and
hf: datasets (offline, from a Hub-like folder and from the datasets cache) give the same examples; bad rows are
named by row; an uncached hf: dataset offline is one line and exit 2."""

import csv
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from finetune_cli import recipe as recipes
from finetune_cli.cli import app
from finetune_cli.data import jsonl, masking
from finetune_cli.errors import FtuneError
from tests.conftest import write_jsonl

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def chats(n: int = 6) -> list[dict]:
    """Conversations with what CSV and Arrow make hard: quotes, commas, newlines, unicode, a system message on
    some, two exchanges on some, an assistant turn kept out of the loss (a field the other messages lack)."""
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": 'Be "brief", please.'}] if i % 2 else []
        messages += [
            {"role": "user", "content": f"Question {i}, with a comma\nand a second line? ünïcödé ✓"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
        if i % 3 == 0:
            messages[-1]["train"] = False
            messages += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": f"Then {i}."}]
        out.append({"messages": messages})
    return out


def alpacas(n: int = 4) -> list[dict]:
    return [
        {"instruction": f"Add {i} and 2", "input": "" if i % 2 else f"{i} 2", "output": str(i + 2)} for i in range(n)
    ]


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def tokenized(tokenizer, records):
    return masking.tokenize_all(tokenizer, records, 256, "assistant")[0]


def test_every_source_gives_the_same_examples(tmp_path, tokenizer):
    import datasets

    convs, rows = chats(), alpacas()
    reference = jsonl.read(write_jsonl(tmp_path / "chats.jsonl", convs))
    expected = tokenized(tokenizer, reference)
    assert len(expected) == len(convs)
    (tmp_path / "chats.json").write_text(json.dumps(convs, indent=1), encoding="utf-8")
    write_parquet(tmp_path / "chats.parquet", convs)
    write_csv(tmp_path / "chats.csv", ["id", "messages"], [[i, json.dumps(c["messages"])] for i, c in enumerate(convs)])
    write_csv(tmp_path / "chats.tsv", ["messages"], [[json.dumps(c["messages"])] for c in convs], delimiter="\t")
    datasets.Dataset.from_list(convs).save_to_disk(str(tmp_path / "saved"))
    split = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(convs[:2]), "test": datasets.Dataset.from_list(convs[2:])}
    )
    split.save_to_disk(str(tmp_path / "saved-splits"))
    (tmp_path / "folder" / "part-2").mkdir(parents=True)
    write_parquet(tmp_path / "folder" / "part-1.parquet", convs[:3])
    write_jsonl(tmp_path / "folder" / "part-2" / "rest.jsonl", convs[3:])
    (tmp_path / "folder" / "README.md").write_text("not data", encoding="utf-8")
    names = {
        "chats.json": "chats.json: row 6",
        "chats.parquet": "chats.parquet: row 6",
        "chats.csv": "chats.csv: row 6",
        "chats.tsv": "chats.tsv: row 6",
        "saved": "saved: row 6",
        "folder": "part-2/rest.jsonl:3",
    }
    for name, last in names.items():
        records = jsonl.read(tmp_path / name)
        assert [r["messages"] for r in records] == [r["messages"] for r in reference], name
        assert records[-1]["source"].endswith(last), records[-1]["source"]
        assert tokenized(tokenizer, records) == expected, name
    spec = recipes.DataSource(path=str(tmp_path / "saved-splits"), split="test")
    records = jsonl.read(spec)
    assert tokenized(tokenizer, records) == expected[2:] and records[0]["source"].endswith("saved-splits[test]: row 1")

    # alpaca-style columns: a CSV's cells are all text (an empty "input" stays empty, "4" stays a string)
    alpaca = tokenized(tokenizer, jsonl.read(write_jsonl(tmp_path / "alpaca.jsonl", rows)))
    cells = [[r["instruction"], r["input"], r["output"]] for r in rows]
    from_csv = jsonl.parse(write_csv(tmp_path / "alpaca.csv", ["instruction", "input", "output"], cells))
    assert from_csv[2] == "alpaca" and tokenized(tokenizer, from_csv[0]) == alpaca
    # a column map applies to a JSON-text column too
    write_csv(tmp_path / "dialog.csv", ["dialog"], [[json.dumps(c["messages"])] for c in convs])
    assert tokenized(tokenizer, jsonl.read(tmp_path / "dialog.csv", columns={"messages": "dialog"})) == expected


def test_parallel_tokenization_equals_one_process(tokenizer, monkeypatch):
    """Forked workers tokenize chunks in order: the same examples as one process, and a template error raised
    from a worker names its record."""
    records = [{"source": f"d.jsonl:{i}", "messages": c["messages"]} for i, c in enumerate(chats(1) * 600)]
    records += [{"source": "t.jsonl:1", "text": "Plain text. " * 150}]  # two chunks of 256
    monkeypatch.setenv("FTUNE_TOKENIZE_WORKERS", "1")
    one, stats = masking.tokenize_all(tokenizer, records, 256, "assistant")
    monkeypatch.setenv("FTUNE_TOKENIZE_WORKERS", "2")
    two, stats2 = masking.tokenize_all(tokenizer, records, 256, "assistant")
    assert len(one) == 600 + 2 and one == two and stats == stats2
    bad = [{"role": "assistant", "content": "a"}]
    records[500] = {"source": "d.jsonl:500", "messages": bad}
    refuse = "{% if messages[0].role == 'assistant' %}{{ raise_exception('a reply first') }}{% endif %}"
    monkeypatch.setattr(tokenizer, "chat_template", refuse + tokenizer.chat_template)
    with pytest.raises(FtuneError, match=r"^d.jsonl:500: chat template cannot render"):
        masking.tokenize_all(tokenizer, records, 256, "assistant")


def test_bad_rows_are_named_by_row(tmp_path, tiny_model_dir):
    good = chats(1)[0]
    rows = [good] * 1300
    rows[2] = {"messages": [{"role": "user", "content": "nothing answers"}]}
    rows[1203] = {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}
    write_parquet(tmp_path / "train.parquet", rows)
    with pytest.raises(FtuneError, match=r"train.parquet: row 3: conversation has no assistant turn"):
        jsonl.read(tmp_path / "train.parquet")
    _, errors, _ = jsonl.parse(tmp_path / "train.parquet")
    assert [(e.kind, e.where.rsplit("/", 1)[-1]) for e in errors] == [
        ("no assistant turn", "train.parquet: row 3"),
        ("unknown role", "train.parquet: row 1,204"),
    ]
    text = json.dumps(good["messages"])
    cells = [[text], ["[{not json"], [text, "extra"], [text]]
    _, errors, _ = jsonl.parse(write_csv(tmp_path / "train.csv", ["messages"], cells))
    assert [(e.kind, e.where.rsplit("/", 1)[-1]) for e in errors] == [
        ("not JSON", "train.csv: row 2"),
        ("wrong cells", "train.csv: row 3"),
    ]

    # validate lists the first bad rows of each kind and counts them all
    many = [good] * 10 + [{"messages": [{"role": "user", "content": "unanswered"}]}] * 25
    write_parquet(tmp_path / "many.parquet", many)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  base: {tiny_model_dir}\ndata:\n  train: many.parquet\n", encoding="utf-8")
    result = runner.invoke(app, ["validate", str(recipe), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["error_counts"] == {"no assistant turn": 25}
    listed = report["errors"]["no assistant turn"]
    assert len(listed) == 20 and listed[0]["where"].endswith("many.parquet: row 11")
    assert report["files"][0] == {
        "path": str(tmp_path / "many.parquet"),
        "format": "messages",
        "examples": 10,
        "errors": 25,
    }


def hub_repo(folder: Path) -> Path:
    """A folder laid out like a Hub dataset repo: Parquet files and a README whose YAML names two subsets."""
    convs = chats()
    for sub in ("chat", "alpaca"):
        (folder / "data" / sub).mkdir(parents=True)
    write_parquet(folder / "data" / "chat" / "train.parquet", convs[:4])
    write_parquet(folder / "data" / "chat" / "test.parquet", convs[4:])
    write_parquet(folder / "data" / "alpaca" / "train.parquet", alpacas())
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: chat\n  default: true\n  data_files:\n  - split: train\n"
        "    path: data/chat/train.parquet\n  - split: test\n    path: data/chat/test.parquet\n"
        "- config_name: alpaca\n  data_files:\n  - split: train\n    path: data/alpaca/train.parquet\n---\n# tiny\n",
        encoding="utf-8",
    )
    return folder


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """The Hub offline (as without network), datasets' cache in tmp_path: returns the cache folder."""
    import datasets
    import huggingface_hub

    cache = tmp_path / "hf-datasets"
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # datasets reads the variables at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_hub_layout_through_the_hf_path(tmp_path, offline_hub, tokenizer):
    repo = hub_repo(tmp_path / "repo")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "data:\n  train:\n    - hf:./repo\n    - {path: 'hf:./repo', subset: alpaca, weight: 2}\n"
        "  eval: {path: 'hf:./repo', split: test}\n",
        encoding="utf-8",
    )
    r = recipes.load(recipe)
    assert r.data.train[0] == f"hf:{repo}"  # relative to the recipe, like a file
    train, evals, info = jsonl.load(r.data, 0)
    convs = chats()
    assert [t["messages"] for t in train[:4]] == [c["messages"] for c in convs[:4]]
    assert [e["messages"] for e in evals] == [c["messages"] for c in convs[4:]]
    assert [(i["format"], i["examples"], i["used"]) for i in info] == [("messages", 4, 4), ("alpaca", 4, 8)]
    assert train[0]["source"] == f"hf:{repo}[train]: row 1" and train[4]["source"] == f"hf:{repo}:alpaca[train]: row 1"
    assert evals[0]["source"] == f"hf:{repo}[test]: row 1"
    alpaca = jsonl.read(write_jsonl(tmp_path / "a.jsonl", alpacas()))
    assert tokenized(tokenizer, train[4:8]) == tokenized(tokenizer, alpaca)
    # the short form names subset and split as errors name rows; a split given twice must agree
    assert jsonl.read(f"hf:{repo}[test]") == evals
    assert jsonl.read(f"hf:{repo}:alpaca")[0]["source"] == f"hf:{repo}:alpaca[train]: row 1"
    with pytest.raises(FtuneError, match=r"split is both 'test' \(in the name\) and 'train'"):
        jsonl.read(recipes.DataSource(path=f"hf:{repo}[test]", split="train"))
    with pytest.raises(FtuneError, match=r"split validation\): Unknown split"):
        jsonl.read(recipes.DataSource(path=f"hf:{repo}", split="validation"))


def cache_hub_dataset(cache: Path, repo_id: str, splits: dict[str, Path], commit: str) -> None:
    """Put a dataset into datasets' cache as `load_dataset(repo_id)` leaves it after a download at `commit`."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, name = repo_id.split("/")
    builder = Parquet(
        cache_dir=str(cache / "build"),
        dataset_name=name,
        config_name="default",
        hash=commit,
        data_files={k: str(v) for k, v in splits.items()},
    )
    builder.download_and_prepare()
    target = cache / f"{org}___{name}" / "default" / "0.0.0"
    target.mkdir(parents=True)
    shutil.move(builder.cache_dir, target / commit)


def hub_recipe(tmp_path: Path, model: Path, train: str, eval_: str = "") -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model:\n  base: {model}\ndata:\n  train: {train}\n{eval_}  max_length: 64\n"
        "method:\n  name: lora\n  r: 4\n  alpha: 8\n"
        f"training:\n  max_steps: 1\n  batch_size: 2\n  save_steps: null\noutput:\n  dir: {tmp_path / 'run'}\n",
        encoding="utf-8",
    )
    return recipe


def test_hub_dataset_from_the_cache_records_its_commit(tmp_path, offline_hub, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home"))
    convs = chats()
    splits = {
        "train": write_parquet(tmp_path / "tr.parquet", convs[:4]),
        "test": write_parquet(tmp_path / "te.parquet", convs[4:]),
    }
    cache_hub_dataset(offline_hub, "testorg/tiny-chat", splits, COMMIT)
    recipe = hub_recipe(
        tmp_path, tiny_model_dir, "hf:testorg/tiny-chat", "  eval: {path: 'hf:testorg/tiny-chat', split: test}\n"
    )
    result = runner.invoke(app, ["train", str(recipe), "--samples", "0"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    train, evals = run["data"]["train"]["files"][0], run["data"]["eval"]
    assert train["path"] == "hf:testorg/tiny-chat" and train["examples"] == 4
    assert {k: train[k] for k in ("hf", "subset", "split", "commit", "rows")} == {
        "hf": "testorg/tiny-chat",
        "subset": "default",
        "split": "train",
        "commit": COMMIT,
        "rows": 4,
    }
    assert train["fingerprint"] and "sha256" not in train
    assert evals["split"] == "test" and evals["commit"] == COMMIT and evals["examples"] == 2


def test_uncached_hub_dataset_offline_is_one_line_and_exit_2(tmp_path, offline_hub, tiny_model_dir):
    recipe = hub_recipe(tmp_path, tiny_model_dir, "hf:nobody/not-cached")
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hf:nobody/not-cached (split train)"), result.stderr
    assert "HF_DATASETS_OFFLINE" in lines[0]
    assert not (tmp_path / "run").exists()


def test_recipe_keys_of_sources(tmp_path):
    def load(data: str):
        path = tmp_path / "recipe.yaml"
        path.write_text(f"data:\n{data}", encoding="utf-8")
        return recipes.load(path)

    r = load("  train:\n    - {path: hf:org/name, split: test, subset: chat, revision: v1.0, weight: 0.5}\n")
    spec = r.data.files()[0]
    assert (spec.path, spec.split, spec.subset, spec.revision, spec.weight) == (
        "hf:org/name",
        "test",
        "chat",
        "v1.0",
        0.5,
    )
    r = load("  train: hf:org/name\n  eval: {path: hf:org/name, split: validation, format: alpaca}\n")
    assert r.data.train == "hf:org/name" and r.data.eval_source().split == "validation"
    assert r.data.eval_source().format == "alpaca"
    with pytest.raises(
        FtuneError, match=r"recipe.yaml:4: unknown key 'data.train.0.splitt'; did you mean 'data.train.0.split'"
    ):
        load("  train:\n    - path: hf:org/name\n      splitt: test\n")
    with pytest.raises(FtuneError, match=r"unknown key 'data.eval.revison'; did you mean 'data.eval.revision'"):
        load("  train: a.jsonl\n  eval: {path: hf:org/name, revison: main}\n")
    with pytest.raises(FtuneError, match=r"recipe.yaml:3: subset applies to hf: datasets only, not to the local"):
        load("  train:\n    - {path: a.jsonl, subset: chat}\n")
    with pytest.raises(FtuneError, match="weight"):
        load("  train: a.jsonl\n  eval: {path: b.jsonl, weight: 2}\n")


def test_sources_that_are_not_one_table_are_refused(tmp_path):
    (tmp_path / "splits").mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        write_jsonl(tmp_path / "splits" / name, chats(2))
    with pytest.raises(FtuneError, match=r"splits: its file names say several splits \(train, test\); name it as hf:"):
        jsonl.read(tmp_path / "splits")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FtuneError, match="no data files in this folder"):
        jsonl.read(tmp_path / "empty")
    (tmp_path / "object.json").write_text(json.dumps({"data": chats(2)}, indent=1), encoding="utf-8")
    with pytest.raises(FtuneError, match="one JSON object, not an array of records.*its list 'data' may hold"):
        jsonl.read(tmp_path / "object.json")
    with pytest.raises(FtuneError, match="split 'test' applies to hf: datasets and save_to_disk folders"):
        jsonl.read(recipes.DataSource(path=str(write_jsonl(tmp_path / "one.jsonl", chats(1))), split="test"))


def test_each_file_of_a_folder_is_read_in_its_own_format(tmp_path):
    """A folder of a chat JSONL and a prompt/completion CSV: each file's format is detected from its own rows, and
    a bad row cites the format of its own file (not the one detected from the folder's first file)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", chats(2))
    write_csv(folder / "b.csv", ["prompt", "completion"], [["Hi", "Hello!"], ["Sum 2 2", "4"]])
    records, errors, found = jsonl.parse(folder)
    assert errors == [] and found == "messages, prompt_completion"
    assert [r["format"] for r in records] == ["messages"] * 2 + ["prompt_completion"] * 2
    assert records[2]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    write_jsonl(folder / "c.jsonl", [alpacas(1)[0], {"prompt": "p", "completion": "c"}])
    with pytest.raises(FtuneError) as caught:
        jsonl.read(folder)
    own = "this line is in prompt_completion format but the file is alpaca (detected from line 1)"
    assert str(caught.value) == f"{folder / 'c.jsonl'}:2: {own}"


def test_a_corrupt_or_truncated_parquet_file_is_named_not_raised(tmp_path):
    """A truncated file (no footer) and one whose footer is whole but a data page is garbage: each is a bad row
    saying the file is not readable Parquet, naming it; never an OSError from pyarrow."""
    good = write_parquet(tmp_path / "good.parquet", chats(6)).read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.parquet").write_bytes(good[:4] + b"\x55" * 60 + good[64:])
    for name in ("truncated.parquet", "corrupt.parquet"):
        path = tmp_path / name
        records, errors, _ = jsonl.parse(path)
        assert records == [] and [(e.kind, e.where) for e in errors] == [("not Parquet", str(path))], name
        with pytest.raises(FtuneError, match=rf"^{re.escape(str(path))}: not a readable Parquet file, corrupt or"):
            jsonl.read(path)
