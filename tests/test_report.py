"""loss.png and report.html of real tiny runs, and the compare page, opened in headless Chromium: the curves drawn
from metrics.jsonl, the figures of run.json and eval.json, links that resolve, and user text (prompts, run names)
shown as text and never run."""

import json
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml
from PIL import Image

from tests.conftest import conversation, write_jsonl

SCRIPT = "<script>window.__xss=1</script>"
IMG = '<img src=x onerror="window.__xss=2">'


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir):
    """A tiny LoRA SFT run whose first eval prompt holds markup, then `ftune eval` (perplexity with the base, and
    --generate) on it: each rewrites report.html."""
    from finetune_cli import recipe as recipes
    from finetune_cli.evaluation import evaluate
    from finetune_cli.training import train

    folder = tmp_path_factory.mktemp("report")
    write_jsonl(folder / "train.jsonl", [conversation(i) for i in range(8)])
    hostile = conversation(100)
    hostile["messages"][1]["content"] = f"What is {SCRIPT} plus {IMG}?"
    write_jsonl(folder / "eval.jsonl", [hostile, conversation(101)])
    recipe = {
        "model": {"base": str(tiny_model_dir)},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "eval_steps": 2, "logging_steps": 1},
        "output": {"dir": str(folder / "run")},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train.run(recipes.load(folder / "recipe.yaml"), samples=1)
    run = folder / "run"
    evaluate.run(str(run), compare_base=True)
    evaluate.run_generate(str(run), metrics=["exact_match", "chrf"], max_new_tokens=4, progress=lambda n: print)
    return run


def open_page(browser, path: Path) -> str:
    """Load a page from disk; its visible text."""
    from selenium.webdriver.common.by import By

    browser.get(path.resolve().as_uri())
    return browser.find_element(By.TAG_NAME, "body").text


def element_text(browser, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, selector).text


def drawn_points(browser, group: str) -> int:
    """How many markers the browser draws in a line's SVG group (one per data point), each of nonzero size."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).filter(u => {"
        " const b = u.getBoundingClientRect(); return b.width > 0 && b.height > 0; }).length",
        f"#curves svg g[id='{group}'] use",
    )


def line_drawn(browser, group: str) -> bool:
    """The line's path spans a nonzero width in the rendered page."""
    return browser.execute_script(
        "const p = document.querySelector(arguments[0]); return !!p && p.getBoundingClientRect().width > 0",
        f"#curves svg g[id='{group}'] path",
    )


def assert_inert(browser, text: str, *literals: str) -> None:
    """The page ran no script of the user's: the markup shows as text, and no element came of it."""
    from selenium.webdriver.common.by import By

    assert browser.execute_script("return typeof window.__xss") == "undefined"
    assert not browser.find_elements(By.TAG_NAME, "script") and not browser.find_elements(By.TAG_NAME, "img")
    for literal in literals:
        assert literal in text


def assert_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        image.verify()
    assert 5_000 < path.stat().st_size < 500_000


def resolved_link(browser, text: str) -> Path:
    """The file a link on the page points to (as the browser resolves its href)."""
    from selenium.webdriver.common.by import By

    href = browser.find_element(By.LINK_TEXT, text).get_attribute("href")
    return Path(unquote(urlparse(href).path))


def test_sft_report(sft_run, browser):
    run = sft_run
    info = json.loads((run / "run.json").read_text())
    evaluations = json.loads((run / "eval.json").read_text())["evaluations"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert_png(run / "loss.png", (700, 360))

    text = open_page(browser, run / "report.html")
    assert_inert(browser, text, SCRIPT, IMG)
    for part in ("prompt", "base", "tuned"):  # as the model wrote it, whatever characters it chose
        shown = browser.execute_script("return document.querySelector(arguments[0]).textContent", f"pre.{part}")
        assert shown == info["samples"][0][part].replace("\r\n", "\n").replace("\r", "\n")

    # the curves: one drawn marker per train loss and per eval row of metrics.jsonl, and the learning rate
    assert element_text(browser, "#status") == "completed"
    assert drawn_points(browser, "train-loss") == sum("loss" in r for r in rows) == 4
    assert drawn_points(browser, "eval-loss") == sum("eval_loss" in r for r in rows) == 3  # before, step 2, step 4
    assert line_drawn(browser, "train-loss") and line_drawn(browser, "learning-rate")

    # the figures of run.json and eval.json
    before_after = element_text(browser, "#before-after")
    for score in (info["eval_before"], info["eval_after"]):
        assert f"{score['perplexity']:.4f}" in before_after and str(score["tokens"]) in before_after
    summary = element_text(browser, "#summary")
    assert f"steps {info['steps']}" in summary and f"last train loss {info['final_loss']:.4f}" in summary
    perplexity, generated = evaluations
    assert perplexity["results"].keys() == {"base", "tuned"} and generated["kind"] == "generate"
    for score in perplexity["results"].values():
        assert f"{score['perplexity']:.4f}" in text
    for metric, value in generated["results"]["tuned"].items():
        assert f"{metric} {value:.4f}" in text
    files = element_text(browser, "#data-files")
    assert str(run.parent / "train.jsonl") in files and " 8 " in f" {files} "
    stats = element_text(browser, "#data-stats")
    assert f"learned tokens {info['data']['train']['learned_tokens']} {info['data']['eval']['learned_tokens']}" in stats
    recipe = yaml.safe_load(element_text(browser, "#recipe"))
    assert recipe == yaml.safe_load((run / "recipe.yaml").read_text())

    # the predictions of --generate, by a link relative to the page
    assert (run / "report.html").read_text().count('href="predictions.jsonl"') >= 1
    assert resolved_link(browser, "predictions.jsonl") == (run / "predictions.jsonl").resolve()


def test_classifier_report(classifier_run, tmp_path, browser):
    """A classifier: accuracy, macro F1, per-class figures and the confusion matrix of run.json, the class counts,
    and (after `ftune eval`, on a copy of the shared run) eval.json's result and the predictions link."""
    from finetune_cli.evaluation import evaluate

    run = tmp_path / "clf"
    shutil.copytree(classifier_run[0], run)
    assert_png(run / "loss.png", (700, 520))  # two panels: the losses, then eval accuracy and macro F1
    evaluate.run(str(run))
    info = json.loads((run / "run.json").read_text())
    result = json.loads((run / "eval.json").read_text())["evaluations"][-1]

    text = open_page(browser, run / "report.html")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = sum("eval_accuracy" in r for r in rows)
    assert drawn_points(browser, "eval-accuracy") == drawn_points(browser, "eval-loss") == evals > 1
    after = info["eval_after"]
    table = element_text(browser, "#before-after")
    assert f"accuracy {info['eval_before']['accuracy']:.4f} {after['accuracy']:.4f}" in table
    assert f"macro F1 {info['eval_before']['macro_f1']:.4f} {after['macro_f1']:.4f}" in table
    for name, figures in after["per_class"].items():
        assert f"{name} {figures['precision']:.4f} {figures['recall']:.4f} {figures['f1']:.4f}" in table
    from selenium.webdriver.common.by import By

    confusion = browser.find_element(By.CSS_SELECTOR, "#before-after table.confusion")
    rows_shown = confusion.find_elements(By.XPATH, ".//tr[td]")
    cells = [[int(td.text) for td in tr.find_elements(By.TAG_NAME, "td")] for tr in rows_shown]
    assert cells == after["confusion"]
    counts = element_text(browser, "#class-counts")
    for name, n in info["data"]["train"]["labels"].items():
        assert f"{name} {n} {info['data']['eval']['labels'][name]}" in counts
    assert f"accuracy {result['results']['tuned']['accuracy']:.4f}" in text
    assert resolved_link(browser, "predictions.jsonl") == (run / "predictions.jsonl").resolve()


def test_compare_page(sft_run, tmp_path, browser):
    from selenium.webdriver.common.by import By

    from finetune_cli.reports import page

    rows = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    other = [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.9}]
    hostile = f"lr{SCRIPT}"
    data = {
        "runs": [
            {"name": "base-lr", "path": str(sft_run), "status": "completed"},
            {"name": hostile, "path": f"runs/{IMG}", "status": "failed"},
        ],
        "differences": [
            {"key": "training.learning_rate", "values": [0.01, 2e-05]},
            {"key": "method.r", "values": [4, None]},
        ],
        "metrics": [
            {"name": "eval loss", "values": [1.5, 1.25], "better": "lower"},
            {"name": "accuracy", "values": [0.8, 0.75], "better": "higher"},
            {"name": "steps", "values": [4, 5], "better": None},
        ],
        "curves": [{"name": "base-lr", "rows": rows}, {"name": hostile, "rows": other}],
    }
    path = tmp_path / "compare.html"
    path.write_text(page.compare_page(data))
    text = open_page(browser, path)
    assert_inert(browser, text, hostile, IMG)
    assert element_text(browser, "#differences").splitlines() == [
        f"key base-lr {hostile}",
        "training.learning_rate 0.01 2e-05",
        "method.r 4 —",
    ]
    marked = browser.find_elements(By.CSS_SELECTOR, ".best")
    best = [(td.find_element(By.XPATH, "../th").text, td.text) for td in marked]
    assert best == [("eval loss (lower is better)", "1.2500 ★"), ("accuracy (higher is better)", "0.8000 ★")]
    assert drawn_points(browser, "run0-eval") == sum("eval_loss" in r for r in rows)
    assert drawn_points(browser, "run1-eval") == 1
    assert line_drawn(browser, "run0-train") and line_drawn(browser, "run1-train")
    assert f"{hostile} train" in browser.execute_script("return document.querySelector('#curves svg').textContent")


def test_failed_run_gets_its_pages_and_keeps_its_error(tmp_path, monkeypatch):
    """A run that fails still gets loss.png and report.html with the reason; a plotting error that follows is
    skipped: the run's own error is what the user sees."""
    from finetune_cli import rundir
    from finetune_cli.errors import FtuneError
    from finetune_cli.reports import plots
    from finetune_cli.training import train

    write_jsonl(tmp_path / rundir.METRICS, [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-3} for s in (1, 2, 3)])
    with pytest.raises(FtuneError, match="training failed: RuntimeError: disk <b>full</b>"):
        with train._status(tmp_path, {"status": "running"}, True, train._StopRequest()):
            raise RuntimeError("disk <b>full</b>")
    assert_png(tmp_path / rundir.LOSS_PLOT, (700, 360))
    html = (tmp_path / rundir.REPORT).read_text()
    assert "failed" in html and "disk &lt;b&gt;full&lt;/b&gt;" in html and "<b>" not in html

    def broken(run_dir):
        raise RuntimeError("no fonts")

    (tmp_path / rundir.LOSS_PLOT).unlink()
    monkeypatch.setattr(plots, "write_loss_png", broken)
    with pytest.raises(FtuneError, match="training failed: ValueError: bad batch"):
        with train._status(tmp_path, {"status": "running"}, True, train._StopRequest()):
            raise ValueError("bad batch")
    assert not (tmp_path / rundir.LOSS_PLOT).exists() and "bad batch" in (tmp_path / rundir.REPORT).read_text()
    assert json.loads((tmp_path / rundir.RUN_JSON).read_text())["status"] == "failed"


def test_preference_run_page(tmp_path, browser):
    """A DPO run logs pair metrics, not an eval loss: its page draws eval accuracy and margin per eval and shows
    run.json's pair figures (a run folder written by hand: the figures, not the training, are under test)."""
    from finetune_cli import rundir
    from finetune_cli.reports import page

    rows = [{"step": s, "loss": 0.7 - 0.05 * s, "learning_rate": 5e-6} for s in range(1, 7)]
    rows += [{"step": s, "eval_accuracy": 0.4 + 0.1 * s, "eval_margin": 0.3 * s} for s in (0, 3, 6)]
    write_jsonl(tmp_path / rundir.METRICS, rows)
    before = {"pairs": 8, "accuracy": 0.375, "margin": -0.125, "chosen_logps": -40.5, "rejected_logps": -40.375}
    after = {"pairs": 8, "accuracy": 0.875, "margin": 2.5, "chosen_logps": -38.0, "rejected_logps": -40.5}
    info = {"status": "interrupted", "reason": "SIGTERM at step 6", "objective": "dpo", "steps": 6}
    (tmp_path / rundir.RUN_JSON).write_text(json.dumps({**info, "eval_before": before, "eval_after": after}))
    page.write_report(tmp_path)
    open_page(browser, tmp_path / rundir.REPORT)
    assert element_text(browser, "#status") == "interrupted" and element_text(browser, "#reason") == info["reason"]
    assert drawn_points(browser, "eval-accuracy") == drawn_points(browser, "eval-margin") == 3
    assert not browser.find_elements("css selector", "#curves svg g[id='eval-loss']")
    table = element_text(browser, "#before-after").splitlines()
    assert "accuracy 0.3750 0.8750" in table and "margin -0.1250 2.5000" in table and "pairs 8 8" in table
