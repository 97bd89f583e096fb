"""Human output on stderr: a rich progress bar for training and summary tables."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

console = Console(stderr=True, highlight=False)


def progress_callback():
    """A TrainerCallback that shows step, loss, learning rate, tokens/s and ETA."""
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def __init__(self):
            self.progress = None
            self.task = None
            self.start = 0.0
            self.train = self.eval = ""

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.time()
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(bar_width=16),
                TextColumn("step {task.completed}/{task.total}"),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, stats="")

        def on_step_end(self, args, state, control, **kw):
            self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if "eval_perplexity" in logs and state.global_step > 0:
                self.eval = f"  eval ppl {logs['eval_perplexity']:.3f}"
            elif "eval_margin" in logs and state.global_step > 0:
                self.eval = f"  eval margin {logs['eval_margin']:.3f} acc {logs['eval_accuracy']:.2f}"
            elif "eval_macro_f1" in logs and state.global_step > 0:
                self.eval = f"  eval acc {logs['eval_accuracy']:.3f} F1 {logs['eval_macro_f1']:.3f}"
            elif "loss" in logs:
                elapsed = max(time.time() - self.start, 1e-9)
                self.train = f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}"
                if state.num_input_tokens_seen:  # image classifiers count no tokens
                    self.train += f"  {state.num_input_tokens_seen / elapsed:,.0f} tok/s"
            if self.progress is not None:
                self.progress.update(self.task, stats=self.train + self.eval)

        def on_train_end(self, args, state, control, **kw):
            if self.progress is not None:
                self.progress.stop()

    return RichProgress()


def status(message: str) -> None:
    console.print(f"[dim]•[/dim] {message}")


def train_summary(result: dict) -> None:
    table = Table(title="ftune train", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("run", result["run_dir"])
    tokens = f" ({result['tokens_seen']:,} tokens)" if result.get("tokens_seen") else ""
    table.add_row("steps", f"{result['steps']} in {result['seconds']:.0f} s{tokens}")
    if result.get("first_loss") is not None:
        table.add_row("train loss", f"{result['first_loss']:.4f} -> {result['final_loss']:.4f} (first -> last step)")
    before, after = result.get("eval_before"), result.get("eval_after")
    if before and after and "macro_f1" in after:
        majority = max(c["support"] for c in after["per_class"].values()) / after["examples"]
        table.add_row(
            "eval classes",
            f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}   macro F1 {before['macro_f1']:.3f} -> "
            f"{after['macro_f1']:.3f}   ({after['examples']:,} rows; the majority class alone: {majority:.3f})",
        )
        if after.get("worst"):
            table.add_row("worst class", worst_class(after["worst"]))
    elif before and after and "margin" in after:
        table.add_row(
            "eval pairs",
            f"margin {before['margin']:.3f} -> {after['margin']:.3f}   accuracy {before['accuracy']:.2f} -> "
            f"{after['accuracy']:.2f}   ({after['pairs']:,} pairs)",
        )
    elif before and after:
        table.add_row(
            "eval loss",
            f"{before['loss']:.4f} -> {after['loss']:.4f}   perplexity {before['perplexity']:.2f} -> "
            f"{after['perplexity']:.2f}   ({after['tokens']:,} scored tokens)",
        )
    trainable, total = result["trainable_parameters"], result["total_parameters"]
    table.add_row("trainable", f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    table.add_row("method", result["method"])
    table.add_row("saved", result["artifact"])
    console.print(table)
    for sample in result.get("samples", []):
        console.print(f"[bold]prompt[/bold]  {sample['prompt']}")
        console.print(f"[bold]base  [/bold]  {sample['base']}")
        console.print(f"[bold]tuned [/bold]  {sample['tuned']}")


def classifier_summary(result: dict) -> None:
    for name, r in result["results"].items():
        table = Table(
            title=f"ftune eval {result['target']} ({name}): accuracy {r['accuracy']:.4f}, macro F1 "
            f"{r['macro_f1']:.4f}, loss {r['loss']:.4f}, {r['examples']:,} rows",
            title_justify="left",
        )
        for col in ("class", "precision", "recall", "F1", "support"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for label, c in r["per_class"].items():
            table.add_row(label, f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", str(c["support"]))
        console.print(table)
        if r.get("worst"):
            console.print(f"worst class {worst_class(r['worst'])}")
    if result.get("predictions"):
        console.print(f"predictions: {result['predictions']}")
    console.print(f"data: {', '.join(result['data'])}")


def worst_class(w: dict) -> str:
    taken = f"; taken for {w['confused_with']} {w['count']} times" if w.get("confused_with") else ""
    return f"{w['label']}: F1 {w['f1']:.3f}, recall {w['recall']:.3f} of {w['support']} rows{taken}"


@contextmanager
def eval_progress():
    """Yields `start(total)`, which adds a bar (showing the display on first use) and returns its advance function."""
    progress = Progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} examples"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )

    def start(total: int):
        if not progress.live.is_started:
            progress.start()
        task = progress.add_task("eval", total=total)
        return lambda n: progress.advance(task, n)

    try:
        yield start
    finally:
        if progress.live.is_started:
            progress.stop()


def eval_summary(result: dict) -> None:
    if any("margin" in r for r in result["results"].values()):
        return pair_summary(result)
    if result.get("kind") == "classification":
        return classifier_summary(result)
    table = Table(title=f"ftune eval {result['target']}", title_justify="left")
    for col in ("model", "scored tokens", "NLL", "loss", "perplexity"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in result["results"].items():
        label = {"base": f"base ({result['base']})", "tuned": "fine-tuned"}.get(name, name)
        table.add_row(label, f"{r['tokens']:,}", f"{r['nll']:.2f}", f"{r['loss']:.4f}", f"{r['perplexity']:.4f}")
    console.print(table)
    if "change" in result:
        c = result["change"]
        console.print(f"perplexity change: {c['perplexity']:+.4f} ({100 * c['relative']:+.1f}%)")
    console.print(f"data: {', '.join(result['data'])}")


def pair_summary(result: dict) -> None:
    """Pair metrics per model: accuracy (chosen more likely than rejected) and the mean log-probability margin."""
    table = Table(title=f"ftune eval {result['target']}", title_justify="left")
    for col in ("model", "pairs", "accuracy", "margin", "chosen logp", "rejected logp"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in result["results"].items():
        label = {"base": f"base ({result['base']})", "tuned": "fine-tuned"}.get(name, name)
        row = [f"{r['accuracy']:.3f}", f"{r['margin']:.3f}", f"{r['chosen_logps']:.2f}", f"{r['rejected_logps']:.2f}"]
        table.add_row(label, f"{r['pairs']:,}", *row)
    console.print(table)
    if "change" in result:
        c = result["change"]
        console.print(f"change: accuracy {c['accuracy']:+.3f}, margin {c['margin']:+.3f}")
    console.print(f"data: {', '.join(result['data'])}")


def tasks_summary(result: dict) -> None:
    """Each harness metric ± its standard error, per model, and the change (tuned − base)."""
    table = Table(title=f"ftune eval --tasks {result['target']}", title_justify="left")
    table.add_column("task metric")
    names = list(result["results"])
    for name in names:
        table.add_column({"base": f"base ({result['base']})", "tuned": "fine-tuned"}.get(name, name), justify="right")
    if result.get("change"):
        table.add_column("change", justify="right")
    for metric in result["metrics"]:
        cells = []
        for name in names:
            value, error = result["results"][name].get(metric), result["stderr"].get(name, {}).get(metric)
            cells.append("-" if value is None else f"{value:.4f}" + (f" ± {error:.4f}" if error is not None else ""))
        if result.get("change"):
            cells.append(f"{result['change'][metric]:+.4f}")
        table.add_row(metric, *cells)
    console.print(table)
    shots = ", ".join(f"{t} {n}-shot" for t, n in result["num_fewshot"].items())
    limit = f", at most {result['limit']:g} examples per task" if result.get("limit") else ""
    console.print(f"lm-evaluation-harness {result['harness']}: {shots}{limit}")


def generate_summary(result: dict) -> None:
    """Each metric for base and fine-tuned and the change (fractions as percentages, BLEU/chrF on 0-100)."""
    table = Table(title=f"ftune eval --generate {result['target']}", title_justify="left")
    table.add_column("metric")
    labels = {"base": f"base ({result['base']})", "tuned": "fine-tuned", "model": "model"}
    for name in result["results"]:
        table.add_column(labels.get(name, name), justify="right")
    change = result.get("change")
    if change:
        table.add_column("change", justify="right")

    def show(metric: str, value: float, sign: bool = False) -> str:
        if metric in ("bleu", "chrf"):  # sacrebleu's 0-100 scale
            return f"{value:+.2f}" if sign else f"{value:.2f}"
        return f"{100 * value:+.1f} pp" if sign else f"{100 * value:.1f}%"  # fractions; changes in points

    for metric in result["metrics"]:
        row = [metric] + [show(metric, r[metric]) for r in result["results"].values()]
        if change:
            row.append(show(metric, change[metric], sign=True))
        table.add_row(*row)
    console.print(table)
    speed = ", ".join(f"{labels.get(k, k)} {v:.1f}" for k, v in result["tokens_per_second"].items())
    console.print(f"{result['examples']} examples, generated tokens/s: {speed}")
    if result.get("predictions"):
        console.print(f"predictions: {result['predictions']}")
    console.print(f"data: {', '.join(result['data'])}")


def recipes_table(items: list[dict]) -> None:
    table = Table(title="shipped recipes (ftune recipes copy NAME DEST)", title_justify="left")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("description")
    for item in items:
        table.add_row(item["name"], item["description"])
    console.print(table)


def validate_report(report: dict) -> None:
    table = Table(title="ftune validate", title_justify="left")
    for col in ("source", "format", "examples", "bad rows"):
        table.add_column(col, justify="left" if col in ("file", "format") else "right", overflow="fold")
    for f in report["files"]:
        table.add_row(f["path"], f["format"] or "-", f"{f['examples']:,}", str(f["errors"]))
    console.print(table)
    for kind, items in report["errors"].items():
        count = report["error_counts"][kind]
        console.print(f"[bold red]{kind}[/bold red]: {count:,}")
        for item in items[:10]:
            console.print(f"  {item['where']}: {item['message']}", markup=False)
        if count > 10:
            console.print(f"  ... and {count - 10:,} more (--json lists the first {len(items)})")
    for warning in report["warnings"][:20]:
        console.print(f"warning: {warning}", markup=False, style="yellow")
    s = report["stats"]
    if "labels" in s:
        class_table(s)
    if "tokens" in s:
        stats = Table(title="training data (before truncation)", title_justify="left")
        for col in ("per example", "min", "p50", "p95", "max"):
            stats.add_column(col, justify="left" if col == "per example" else "right")
        for name, key in (("tokens", "tokens"), ("learned tokens", "learned_tokens")):
            if key in s:
                stats.add_row(name, *(f"{s[key][q]:,}" for q in ("min", "p50", "p95", "max")))
        console.print(stats)
    if "labels" in s:
        over = f"; {s['over_max_length']:,} texts over max_length {s['max_length']:,} (truncated)"
        over = over if "tokens" in s else ""
        console.print(f"{s['examples']:,} examples{over}; {s['steps_per_epoch']:,} steps per epoch")
    else:
        console.print(
            f"{s['examples']:,} examples; {s['over_max_length']:,} over max_length {s['max_length']:,} "
            f"(truncation loses {s['learned_tokens_lost_to_truncation']:,} learned tokens); "
            f"{s['learned_tokens_per_epoch']:,} learned tokens per epoch; {s['steps_per_epoch']:,} steps per epoch"
        )
    if report["ok"]:
        console.print("[green]ok[/green]: no bad lines")
    else:
        console.print(f"[red]{report['error_count']} error(s)[/red]")


def class_table(s: dict) -> None:
    """A classifier's rows per class, training and eval, and the imbalance."""
    evals = s.get("eval", {}).get("labels", {})
    table = Table(title=f"classes ({s['input']})", title_justify="left")
    for col in ("class", "train", "eval"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, n in s["labels"].items():
        table.add_row(Text(name), f"{n:,}", f"{evals.get(name, 0):,}" if "eval" in s else "-")
    console.print(table)
    console.print(f"imbalance (largest/smallest class in training): {s['imbalance']}")


def preview(examples: list[dict]) -> None:
    """Tokens on alternating shades so boundaries show; learned tokens green, masked ones grey. A classifier's
    rows show their label and class id (the loss is on the class: no token is learned)."""

    styles = {True: ("black on green3", "black on dark_sea_green2"), False: ("grey70 on grey15", "grey70 on grey30")}
    for ex in examples:
        more = f", first of {ex['chunks']} chunks" if ex["chunks"] > 1 else ""
        if "label" in ex:
            console.rule(ex["source"] if "image" in ex else f"{ex['source']}  {ex['count']} tokens" + more)
            cls = "not a known class" if ex["class_id"] is None else f"class id {ex['class_id']}"
            truncated = ", text truncated to max_length" * ex["truncated"]
            console.print(f"label {ex['label']} ({cls}){truncated}", markup=False, style="bold")
            if "image" in ex:
                console.print(f"image {ex['image']}", markup=False)
                continue
        else:
            head = f"{ex['source']}  {ex['count']} tokens, {ex['learned']} learned"
            console.rule(head + ", truncated" * ex["truncated"] + more)
        text = Text()
        for i, tok in enumerate(ex["tokens"]):
            piece = tok["text"].replace("\n", "\u21b5\n")
            text.append(piece, style=styles[tok["learned"]][i % 2])
        console.print(text)
    if any("label" not in ex for ex in examples):
        console.print(Text.assemble(("learned", "black on green3"), "  ", ("not learned", "grey70 on grey15")))


def human_bytes(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def human_count(n: int) -> str:
    for size, unit in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def inspect_table(info: dict):
    """`ftune inspect` for humans: a two-column table, then the rendered template sample."""
    from rich.console import Group
    from rich.panel import Panel

    def num(value) -> str:
        return f"{value:,}" if isinstance(value, int) else "-"

    def token(entry: dict) -> Text:
        if entry.get("token") is None:
            return Text("none", style="dim")
        return Text(f"{entry['token']} (id {entry['id']})")  # Text: tokens like [INST] are not markup

    table = Table(title=f"ftune inspect {info['model']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("path", Text(str(info["path"])))
    table.add_row("architecture", Text(f"{info['architecture']} ({info['model_type']})"))
    table.add_row("parameters", f"{num(info['parameters'])} ({human_count(info['parameters'])})")
    table.add_row("layers", num(info["layers"]))
    table.add_row("hidden size", num(info["hidden_size"]))
    table.add_row("context length", f"{num(info['context_length'])} tokens")
    vocab = num(info["vocab_size"])
    if info["tokenizer_size"] != info["vocab_size"]:
        vocab += f" (tokenizer: {num(info['tokenizer_size'])})"
    table.add_row("vocabulary", vocab)
    table.add_row("stored dtype", info["dtype"] or "-")
    for name in ("bos", "eos", "pad", "unk"):
        cell = token(info["special_tokens"][name])
        if name == "pad" and info["pad_is_eos"]:
            cell.append(" = eos", style="dim")
        table.add_row(f"{name} token", cell)
    eot = Text(", ".join(f"{e['token']} (id {e['id']})" for e in info["end_of_turn"]) or "none")
    table.add_row("end of turn", eot)
    table.add_row("chat template", "yes" if info["chat_template"] else "no")
    for i, dtype in enumerate(info["memory"]):
        label = "memory, weights only" if i == 0 else ""
        table.add_row(label, f"{dtype:<9} {human_bytes(info['memory'][dtype])}")

    parts = [table]
    if info.get("template_sample") is not None:
        parts.append(Panel(Text(info["template_sample"]), title="chat template sample", title_align="left"))
    elif info.get("template_error"):
        parts.append(Text(f"chat template cannot render a sample: {info['template_error']}", style="yellow"))
    return Group(*parts)


def runs_table(summaries: list[dict]) -> None:
    """`ftune runs`: one row per run, each eval figure and task metric on a line of its own in its cell, the best
    of each figure across the runs marked with a star."""
    from finetune_cli.reports import runs

    table = Table(title=f"ftune runs: {len(summaries)} run{'s' * (len(summaries) != 1)}", title_justify="left")
    for col in ("run", "status", "started", "objective", "base", "steps", "time", "last loss"):
        table.add_column(col, justify="right" if col in ("steps", "time", "last loss") else "left", no_wrap=True)
    table.add_column("eval before → after", no_wrap=True)
    table.add_column("task metrics", no_wrap=True)
    tasks = runs.task_metrics(summaries)
    marked = ["final_loss", *(f"{n}_after" for n, _ in _EVAL_LABELS), *tasks]
    marks = {c: runs.best([runs.value(s, c) for s in summaries], runs.better(c, summaries)) for c in marked}

    def figure(i: int, column: str) -> str:
        return _figure(runs.value(summaries[i], column)) + (" ★" if i in marks[column] else "")

    for i, s in enumerate(summaries):
        if s["status"] == "unreadable":
            table.add_row(Text(s["name"]), Text("unreadable", style="red"))
            continue
        base = f"<- {s['parent']}" if s.get("parent") else _short(s.get("base"))
        evals = [
            f"{label} {_figure(s.get(f'{n}_before'))} → {figure(i, f'{n}_after')}"
            for n, label in _EVAL_LABELS
            if f"{n}_before" in s or f"{n}_after" in s
        ]
        row = [Text(s["name"]), _status(s), (s.get("started") or "-").replace("T", " ")[:16]]
        row += [Text(f"{s.get('objective') or '-'}/{s.get('method') or '-'}"), Text(base)]
        row += [_figure(s.get("steps")), _duration(s.get("train_seconds")), figure(i, "final_loss")]
        row += ["\n".join(evals) or "-", "\n".join(f"{k} {figure(i, k)}" for k in s["task_metrics"]) or "-"]
        table.add_row(*row)
    if any(marks.values()):
        table.caption, table.caption_justify = "★ the best in its column", "left"
    console.print(table)
    for s in summaries:
        if s.get("reason"):
            console.print(Text(f"{s['name']} ({s['status']}): {s['reason']}", style="dim"))


_EVAL_LABELS = (("eval_loss", "loss"), ("perplexity", "ppl"), ("accuracy", "accuracy"), ("macro_f1", "macro F1"),
                ("margin", "margin"))  # fmt: skip


def _status(s: dict) -> Text:
    """The status, coloured; a running run's step and time left."""
    style = {"completed": "green", "running": "cyan", "failed": "red", "stopped": "yellow"}.get(s["status"], "")
    text = s["status"]
    if s["status"] == "running":
        text += f" {s.get('step', 0)}/{s.get('max_steps') or '?'}"
        text += f", {_duration(s['eta_seconds'])} left" if s.get("eta_seconds") is not None else ""
    return Text(text, style=style)


def _figure(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _short(base) -> str:
    """A base model as the table shows it: a folder by its name, a builtin or hub id as it is."""
    if not base:
        return "-"
    return base.rstrip("/").rsplit("/", 1)[-1] if str(base).startswith(("/", "~", ".")) else str(base)


def compare_tables(data: dict) -> None:
    """`ftune compare` in the terminal: the recipe keys that differ, then the figures side by side (best starred)."""
    from finetune_cli.reports import runs

    names = [Text(f"{r['name']}\n{r['status']}") for r in data["runs"]]
    if data["differences"]:
        table = Table(title="recipe differences", title_justify="left")
        table.add_column("key", style="bold")
        for name in names:
            table.add_column(name)
        for d in data["differences"]:
            table.add_row(Text(d["key"]), *(Text(_setting(v)) for v in d["values"]))
        console.print(table)
    else:
        console.print("the recipes are the same (apart from output.dir)")
    table = Table(title="metrics", title_justify="left")
    table.add_column("metric", style="bold")
    for name in names:
        table.add_column(name, justify="right")
    for m in data["metrics"]:
        marked = runs.best(m["values"], m["better"])
        label = f"{m['name']} ({m['better']} is better)" if m["better"] else m["name"]
        show = _duration if m["name"] == "train_seconds" else _figure
        table.add_row(label, *(show(v) + (" ★" if i in marked else "") for i, v in enumerate(m["values"])))
    console.print(table)
    for r in data["runs"]:
        console.print(Text(f"{r['name']}: {r['path']}", style="dim"))


def _setting(value) -> str:
    """A recipe value as YAML would show it."""
    import json

    return "null" if value is None else value if isinstance(value, str) else json.dumps(value)
