"""A run's report.html, and the page `ftune compare -o` writes: one self-contained HTML file each (inline CSS and
SVG, nothing fetched, no script), to open from disk or send to someone.

Run names, recipes, data paths and model answers are the user's text: jinja2 escapes every value (autoescape on),
so a prompt holding `<script>` shows those characters and runs nothing. The only markup passed through unescaped
is matplotlib's SVG, which escapes its own text."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from urllib.parse import quote

from finetune_cli import files, rundir
from finetune_cli.reports import plots

# run.json's figures shown in the summary, in this order, with their labels
SUMMARY = {
    "status": "status",
    "reason": "reason",
    "started": "started",
    "seconds": "seconds",
    "objective": "objective",
    "method": "method",
    "steps": "steps",
    "train_loss": "mean train loss",
    "first_loss": "first train loss",
    "final_loss": "last train loss",
    "tokens_seen": "tokens seen",
    "train_seconds": "training loop seconds",
    "trainable_parameters": "trainable parameters",
    "total_parameters": "total parameters",
    "peak_gpu_memory_mib": "peak GPU memory (MiB)",
    "device": "device",
    "precision": "precision",
    "resumed_from": "resumed from",
    "artifact": "artifact",
}
# the figures of each kind of score (results.Score, PairScore, ClassScore) in its tables
FIGURES = {
    "perplexity": ["perplexity", "loss", "tokens"],
    "pairs": ["accuracy", "margin", "chosen_logps", "rejected_logps", "pairs"],
    "classification": ["accuracy", "macro_f1", "loss", "examples"],
}
LABELS = {"macro_f1": "macro F1", "chosen_logps": "chosen log-prob", "rejected_logps": "rejected log-prob"}

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 62em; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; word-break: break-all; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; } caption { text-align: left; font-weight: 600; padding: .3em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f5f5f5; }
td.best { background: #e3f4e3; font-weight: 600; }
pre { background: #f7f7f7; border: 1px solid #e2e2e2; padding: .6em; white-space: pre-wrap; word-break: break-word; }
.status { display: inline-block; padding: .1em .6em; border-radius: .8em; background: #eee; font-weight: 600; }
.completed { background: #d8f0d8; } .failed { background: #f6d5d5; } .interrupted, .running { background: #f8ecc8; }
.curves svg { max-width: 100%; height: auto; } .muted { color: #777; } .sample { margin-bottom: 1.4em; }
"""

_REPORT = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ name }} · ftune run</title><style>{{ css }}</style></head><body>
<h1>{{ name }}</h1>
<p><span id="status" class="status {{ info.status }}">{{ info.status or "unknown" }}</span>
{% if info.reason %}<span id="reason">{{ info.reason }}</span>{% endif %}
<span class="muted">· {{ path }} · page written {{ written }}</span></p>

<h2>Summary</h2>
<table id="summary">
{% for label, value in summary %}<tr><th>{{ label }}</th><td>{{ value }}</td></tr>{% endfor %}
</table>

<h2>Curves</h2>
{% if curves %}<div class="curves" id="curves">{{ curves }}</div>
{% else %}<p class="muted">No metrics logged yet.</p>{% endif %}

{% if before_after %}<h2>Eval before and after training</h2>
{{ scores(before_after, "before-after") }}{% endif %}

{% if evaluations %}<h2>Evaluations (ftune eval)</h2>
{% for e in evaluations %}<section class="evaluation">
<h3>{{ e.title }}</h3>
<p class="muted">data: {{ e.data | join(", ") }}{% if e.target %} · target {{ e.target }}{% endif %}</p>
{% if e.kind in ("generate", "tasks") %}{{ metrics_table(e) }}{% elif e.columns %}{{ scores(e.columns) }}{% endif %}
{% if e.change %}<p>change (tuned − base):
{% for k, v in e.change.items() %}{{ k if e.kind == "tasks" else label(k) }} {{ v | num }}{{ ", " if not loop.last }}
{% endfor %}</p>{% endif %}
{% if e.predictions %}<p>predictions: <a href="{{ e.predictions.href }}">{{ e.predictions.name }}</a></p>{% endif %}
</section>{% endfor %}{% endif %}

{% if samples %}<h2>Sample answers</h2>
{% for s in samples %}<div class="sample"><h3>Prompt</h3><pre class="prompt">{{ s.prompt }}</pre>
<h3>Base model</h3><pre class="base">{{ s.base }}</pre><h3>Tuned model</h3><pre class="tuned">{{ s.tuned }}</pre></div>
{% endfor %}{% endif %}

{% if predictions %}<h2>Predictions</h2><ul id="predictions">
{% for p in predictions %}<li><a href="{{ p.href }}">{{ p.name }}</a></li>{% endfor %}</ul>{% endif %}

<h2>Data</h2>
{% if data.files %}<table id="data-files"><caption>Training files</caption>
<tr><th>path</th><th>format</th><th>examples</th><th>weight</th><th>used</th><th>sha256 / commit</th></tr>
{% for f in data.files %}<tr><td>{{ f.path }}</td><td>{{ f.format }}{% if f.detected %} (detected){% endif %}</td>
<td class="n">{{ f.examples | num }}</td><td class="n">{{ f.weight | num }}</td><td class="n">{{ f.used | num }}</td>
<td><code>{{ (f.sha256 or f.commit or f.fingerprint or "") | truncate(16, True, "…", 0) }}</code></td></tr>{% endfor %}
</table>{% endif %}
{% if data.splits %}<table id="data-stats"><caption>Tokenized</caption>
<tr><th></th>{% for split in data.splits %}<th>{{ split }}</th>{% endfor %}</tr>
{% for key in data.rows %}<tr><th>{{ key | replace("_", " ") }}</th>
{% for split in data.splits %}<td class="n">{{ data.splits[split].get(key) | num }}</td>{% endfor %}</tr>{% endfor %}
</table>{% endif %}
{% if data.classes %}<table id="class-counts"><caption>Rows per class</caption>
<tr><th>class</th>{% for split in data.splits %}<th>{{ split }}</th>{% endfor %}</tr>
{% for c in data.classes %}<tr><td>{{ c }}</td>
{% for split in data.splits %}<td class="n">{{ (data.splits[split].labels or {}).get(c) | num }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endif %}

<h2>Recipe</h2>
{% if recipe %}<pre id="recipe">{{ recipe }}</pre>{% else %}<p class="muted">recipe.yaml is missing.</p>{% endif %}
</body></html>
"""

_MACROS = """{% macro scores(columns, id=None) %}{% set kind = kind_of(columns[0][1]) %}
<div{% if id %} id="{{ id }}"{% endif %} class="scores"><table>
<tr><th></th>{% for name, _ in columns %}<th>{{ name }}</th>{% endfor %}</tr>
{% for figure in figures[kind] %}<tr><th>{{ label(figure) }}</th>
{% for _, score in columns %}<td class="n">{{ score.get(figure) | num }}</td>{% endfor %}</tr>{% endfor %}</table>
{% if kind == "classification" %}{% set name, score = columns[-1] %}
<table class="per-class"><caption>Per class ({{ name }})</caption>
<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{% for c, f in score.per_class.items() %}<tr><td>{{ c }}</td><td class="n">{{ f.precision | num }}</td>
<td class="n">{{ f.recall | num }}</td><td class="n">{{ f.f1 | num }}</td><td class="n">{{ f.support | num }}</td></tr>
{% endfor %}
</table>
<table class="confusion">
<caption>Confusion matrix ({{ name }}): rows the reference class, columns the prediction</caption>
<tr><th></th>{% for c in score.labels %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in score.confusion %}<tr><th>{{ score.labels[loop.index0] }}</th>
{% for n in row %}<td class="n">{{ n }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
</div>{% endmacro %}
{% macro metrics_table(e) %}<table class="generate"><tr><th>metric</th>
{% for name in e.results %}<th>{{ name }}</th>{% endfor %}</tr>
{% for m in e.metrics %}<tr><th>{{ m }}</th>
{% for name, r in e.results.items() %}{% set error = (e.stderr or {}).get(name, {}).get(m) %}
<td class="n">{{ r.get(m) | num }}{% if error is not none %} ± {{ error | num }}{% endif %}</td>{% endfor %}</tr>
{% endfor %}{% if e.tokens_per_second %}<tr><th>tokens per second</th>
{% for name in e.results %}<td class="n">{{ e.tokens_per_second.get(name) | num }}</td>{% endfor %}</tr>{% endif %}
</table>{% endmacro %}
"""

_COMPARE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>ftune compare: {{ runs | map(attribute="name") | join(", ") }}</title><style>{{ css }}</style></head><body>
<h1>Runs compared</h1>
<table id="runs"><tr><th>run</th><th>status</th><th>path</th></tr>
{% for r in runs %}<tr><td>{{ r.name }}</td><td><span class="status {{ r.status }}">{{ r.status }}</span></td>
<td>{{ r.path }}</td></tr>{% endfor %}</table>

<h2>Recipe differences</h2>
{% if differences %}<table id="differences"><tr><th>key</th>{% for r in runs %}<th>{{ r.name }}</th>{% endfor %}</tr>
{% for d in differences %}<tr><th>{{ d.key }}</th>{% for v in d["values"] %}<td>{{ v | value }}</td>{% endfor %}</tr>
{% endfor %}</table>{% else %}<p class="muted">The recipes are the same.</p>{% endif %}

<h2>Metrics</h2>
{% if metrics %}<table id="metrics"><tr><th>metric</th>{% for r in runs %}<th>{{ r.name }}</th>{% endfor %}</tr>
{% for m in metrics %}<tr><th>{{ m.name }}
{% if m.better %} <span class="muted">({{ m.better }} is better)</span>{% endif %}</th>
{% for v in m["values"] %}{% if loop.index0 in m.best %}<td class="n best" title="best">{{ v | num }} ★</td>
{% else %}<td class="n">{{ v | num }}</td>{% endif %}{% endfor %}</tr>{% endfor %}</table>
{% else %}<p class="muted">No metrics to compare.</p>{% endif %}

<h2>Loss curves</h2>
{% if curves %}<div class="curves" id="curves">{{ curves }}</div>
{% else %}<p class="muted">No metrics logged.</p>{% endif %}
</body></html>
"""


def report_page(run_dir: Path, curves_svg: str | None = None) -> str:
    """The run's page: status, summary, curves (`curves_svg`, else drawn from metrics.jsonl), eval tables, sample
    answers, predictions, data and recipe."""
    from markupsafe import Markup

    run_dir = Path(run_dir)
    info = rundir.read_run_json(run_dir, strict=False) or {}
    rows = plots.read_metrics(run_dir)
    try:
        recipe = (run_dir / rundir.RECIPE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        recipe = None
    evaluations = [_evaluation(e, run_dir) for e in rundir.evaluations(run_dir)]
    return _template("report").render(
        name=run_dir.resolve().name,
        path=str(run_dir),
        written=time.strftime("%Y-%m-%d %H:%M"),
        info=info,
        summary=[(label, _format(info[key])) for key, label in SUMMARY.items() if info.get(key) is not None],
        curves=Markup(curves_svg or plots.svg(rows)) if plots.has_curves(rows) else None,
        before_after=_columns({"before": info.get("eval_before"), "after": info.get("eval_after")}),
        evaluations=evaluations,
        samples=[s for s in info.get("samples") or [] if isinstance(s, dict)],
        predictions=_predictions(run_dir, evaluations),
        data=_data(info.get("data") or {}),
        recipe=recipe,
    )


def write_report(run_dir: Path, curves_svg: str | None = None) -> Path:
    path = Path(run_dir) / rundir.REPORT
    files.write_text(path, report_page(run_dir, curves_svg))
    return path


def write_pictures(run_dir: Path) -> None:
    """loss.png and report.html at the end of a training run, whatever its status. A plotting error is skipped,
    never raised: it must not fail a run, or hide why it failed, for the sake of a picture."""
    curves = None
    with contextlib.suppress(Exception):
        curves = plots.write_loss_png(run_dir)
    refresh_report(run_dir, curves)


def refresh_report(run_dir: Path, curves_svg: str | None = None) -> None:
    """report.html rewritten (after `ftune eval` adds a result to the run); an error is skipped, as above."""
    with contextlib.suppress(Exception):
        write_report(run_dir, curves_svg)


def compare_page(data: dict) -> str:
    """`ftune compare -o`'s page from {"runs", "differences", "metrics", "curves"} (reports.compare builds it):
    the recipes' differences, the metrics side by side with the best of each marked, the curves overlaid."""
    from markupsafe import Markup

    curves = [c for c in data.get("curves") or [] if plots.has_curves(c.get("rows") or [])]
    return _template("compare").render(
        runs=data.get("runs") or [],
        differences=data.get("differences") or [],
        metrics=[{**m, "best": _best(m.get("values") or [], m.get("better"))} for m in data.get("metrics") or []],
        curves=Markup(plots.overlay_svg(curves)) if curves else None,
    )


def _best(values: list, better: str | None) -> set[int]:
    """The indices of the best value ("lower" or "higher" is better); none when there is no order or one value."""
    numbers = {i: v for i, v in enumerate(values) if plots.is_number(v)}
    if better not in ("lower", "higher") or len(numbers) < 2:
        return set()
    best = (min if better == "lower" else max)(numbers.values())
    return {i for i, v in numbers.items() if v == best}


def _evaluation(e: dict, run_dir: Path) -> dict:
    """An eval.json result ready for the page: its title and its predictions file's link."""
    kind = e.get("kind") or "perplexity"
    if kind == "perplexity" and any(_kind(r) == "pairs" for r in e["results"].values()):
        kind = "pairs"
    title = {
        "generate": "Generated answers (--generate)",
        "pairs": "Pair metrics",
        "tasks": f"Benchmarks (--tasks, lm-evaluation-harness {e.get('harness') or ''})".replace(" )", ")"),
    }.get(kind, kind.capitalize())
    predictions = _link(run_dir, e["predictions"]) if isinstance(e.get("predictions"), str) else None
    return {**e, "kind": kind, "title": title, "predictions": predictions, "columns": _columns(e["results"])}


def _columns(scores: dict) -> list[tuple[str, dict]]:
    """(name, score) for each model scored ("before"/"after", "base"/"tuned", "model"), in the order given."""
    return [(name, score) for name, score in scores.items() if isinstance(score, dict)]


def _predictions(run_dir: Path, evaluations: list[dict]) -> list[dict]:
    """Every predictions file of the run: those eval.json names and those in the run folder."""
    found = [e["predictions"] for e in evaluations if e.get("predictions")]
    named = {p["href"] for p in found}
    with contextlib.suppress(OSError):
        for entry in sorted(run_dir.iterdir()):
            if entry.name == rundir.PREDICTIONS or rundir.OTHER_PREDICTIONS.fullmatch(entry.name):
                link = _link(run_dir, entry.name)
                if link["href"] not in named:
                    found.append(link)
                    named.add(link["href"])
    return found


def _link(run_dir: Path, name: str) -> dict:
    """A file as a link relative to the run folder (the page lives there), so the folder can move whole."""
    path = Path(name)
    relative = os.path.relpath(path, run_dir.resolve()) if path.is_absolute() else name
    return {"name": name, "href": quote(Path(relative).as_posix())}


def _data(data: dict) -> dict:
    """run.json's data section as tables: the training files, the token counts per split, the class counts."""
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    splits = {name: data[name] for name in ("train", "eval") if isinstance(data.get(name), dict)}
    keys = []
    for stats in splits.values():
        keys += [k for k, v in stats.items() if k not in keys and (plots.is_number(v) or k == "cache")]
    classes = []
    for stats in splits.values():
        classes += [c for c in stats.get("labels") or {} if c not in classes]
    if isinstance(data.get("eval"), dict) and (data["eval"].get("path") or data["eval"].get("split")):
        eval_source = data["eval"].get("path") or f"eval_split {data['eval']['split']}"
        splits = {**splits, "eval": {**splits["eval"], "source": eval_source}}
        keys.insert(0, "source")
    return {"files": train.get("files") or [], "splits": splits, "rows": keys, "classes": classes}


def _kind(score) -> str:
    if not isinstance(score, dict):
        return "perplexity"
    if "macro_f1" in score:
        return "classification"
    return "pairs" if "margin" in score else "perplexity"


def _format(value) -> str:
    """A figure as the page shows it: floats to 4 decimals, integers whole, nothing as an em dash."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e9 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


def _value(value) -> str:
    """A recipe value as the YAML holds it (a learning rate of 2e-05 stays that, not 0.0000)."""
    if value is None:
        return "—"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _label(key: str) -> str:
    return LABELS.get(key, key.replace("_", " "))


def _template(name: str):
    """The page's template in an environment that escapes every value (autoescape on)."""
    from jinja2 import DictLoader, Environment
    from markupsafe import Markup

    env = Environment(
        loader=DictLoader({"report": _MACROS + _REPORT, "compare": _COMPARE}),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=_format, value=_value)
    env.globals.update(css=Markup(CSS), figures=FIGURES, kind_of=_kind, label=_label)
    return env.get_template(name)
