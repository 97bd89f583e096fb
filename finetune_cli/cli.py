"""The `ftune` command: parses, calls, renders. Human output on stderr, `--json` on stdout."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from finetune_cli.errors import FtuneError


class _Commands(TyperGroup):
    """Every command runs inside the one error mapping (`_errors`), installed here once."""

    def invoke(self, ctx):
        with _errors():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Commands,
    help="Fine-tune Hugging Face causal language models from YAML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and library logs.")):
    _state["debug"] = debug
    if not debug:
        _quiet_libraries()


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # no "Retrying in 1s" lines before our one-line error
    os.environ.setdefault("DATASETS_VERBOSITY", "error")  # "Using the latest cached version": run.json says which
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # bitsandbytes asks the Hub for a CPU kernel when it is imported (on AVX512-BF16 CPUs, with `kernels`
    # installed, as transformers >= 5.25 does): offline that is a "Skipping publisher trust check" line before ours
    logging.getLogger("kernels").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if "transformers" in sys.modules:  # already imported (e.g. in-process callers): the env vars came too late
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


@contextmanager
def _errors():
    """User errors become one `error:` line and exit 2; --debug shows the traceback instead."""
    try:
        yield
    except FtuneError as exc:
        if _state["debug"]:
            raise
        sys.stderr.write(f"error: {_rank()}{exc}\n")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise  # exit codes and usage errors (exit 2) are typer's own
    except Exception as exc:  # noqa: BLE001
        if _state["debug"]:
            raise
        sys.stderr.write(f"error: {_rank()}{type(exc).__name__}: {exc} (run with --debug for the traceback)\n")
        raise typer.Exit(1) from None


def _emit(result, as_json: bool, render=None) -> None:
    """The one place a command's result leaves: JSON on stdout with --json, else `render` (to stderr)."""
    if hasattr(result, "dump"):
        result = result.dump()
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    elif render is not None:
        render(result)


def _rank() -> str:
    """'rank N: ' in the error lines of a distributed run's other processes."""
    from finetune_cli.training import launch

    return "" if launch.is_main() else f"rank {launch.rank()}: "


@app.command()
def train(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file, or a run directory to resume."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in output.dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its newest complete checkpoint."),
    force: bool = typer.Option(False, "--force", help="With --resume: continue although the recipe changed."),
    samples: int = typer.Option(
        1, "--samples", min=0, help="Eval prompts answered by base and tuned model at the end (0 skips)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
    num_processes: Optional[int] = typer.Option(
        None,
        "--num-processes",
        min=1,
        help="Train on N processes (one per GPU; CPU processes without GPUs) through accelerate launch. "
        "Sets distributed.num_processes.",
    ),
):
    """Train a model as RECIPE says and write the run directory."""
    from finetune_cli import rundir, ui
    from finetune_cli.training import launch

    overrides = list(set_ or []) + ([f"distributed.num_processes={num_processes}"] if num_processes else [])
    resolved = rundir.load_recipe(recipe_path, overrides, resume)
    from finetune_cli.training import train as training  # torch and friends: seconds, after the recipe is checked

    if launch.wanted(resolved):  # check everything here, then start one `ftune train` per process
        launch.check(resolved)
        if not training.preflight(resolved, overwrite, resume, force).completed:
            ui.status(f"launching {resolved.distributed.num_processes} processes ({resolved.distributed.strategy})")
            flags = (overrides, samples, overwrite, resume, force, as_json, _state["debug"])
            raise typer.Exit(launch.launch(resolved, launch.relaunch_args(str(recipe_path), *flags), _state["debug"]))
    main = launch.is_main()
    result = training.run(
        resolved,
        overwrite=overwrite,
        callbacks=[ui.progress_callback()] if main else [],
        samples=samples,
        log=ui.status if main else (lambda msg: None),
        resume=resume,
        force=force,
    )
    if not main:
        return
    if result.get("already_completed"):
        sys.stderr.write(f"{result['run_dir']} is already completed; nothing to resume\n")
        _emit(result, as_json)
        return
    _emit(result, as_json, ui.train_summary)


@app.command("eval")
def eval_(
    target: str = typer.Argument(..., help="Run directory, merged/HF model folder, or base model name."),
    data: Optional[List[Path]] = typer.Option(
        None,
        "--data",
        help="JSONL to score, in any data format (repeatable). Default: the run's eval data.",
    ),
    base: bool = typer.Option(False, "--base", help="Score the run's base model only, without the adapter."),
    compare_base: bool = typer.Option(
        False, "--compare-base", help="Score base and fine-tuned model, show the change."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per forward pass."),
    max_length: Optional[int] = typer.Option(
        None, "--max-length", min=2, help="Context length. Default: the run's data.max_length, else 2048."
    ),
    stride: Optional[int] = typer.Option(
        None, "--stride", min=1, help="Sliding-window step for long texts. Default: half the context."
    ),
    generate: bool = typer.Option(
        False, "--generate", help="Generate an answer to each conversation and score it (task metrics)."
    ),
    metrics: Optional[str] = typer.Option(
        None,
        "--metrics",
        help="With --generate: exact_match,bleu,chrf,rouge_l,json_valid,json_match,accuracy,macro_f1 "
        "(default: all that apply).",
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="With --generate: tokens per answer."),
    predictions: Optional[Path] = typer.Option(
        None,
        "--predictions",
        help="JSONL of the answers (--generate) or a classifier's predictions (default: RUN/predictions.jsonl).",
    ),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="With --generate: temperature."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="With --generate: nucleus sampling probability."),
    do_sample: bool = typer.Option(False, "--do-sample/--greedy", help="With --generate: sample, or greedy."),
    seed: Optional[int] = typer.Option(None, "--seed", help="With --generate: seed for sampling."),
    tasks: Optional[str] = typer.Option(
        None,
        "--tasks",
        help="lm-evaluation-harness tasks, comma-separated: names (hellaswag,arc_easy) or task YAML files/folders.",
    ),
    num_fewshot: Optional[int] = typer.Option(
        None, "--num-fewshot", min=0, help="With --tasks: few-shot examples (default: each task's own)."
    ),
    limit: Optional[float] = typer.Option(
        None, "--limit", help="With --tasks: examples per task (a count, or a fraction below 1); for quick checks."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
):
    """Perplexity of TARGET: exp(total NLL / scored tokens) over the whole data set; with --generate, task metrics
    of its generated answers (exact match, BLEU, chrF, ROUGE-L, JSON, label accuracy and macro F1); with --tasks,
    benchmarks through lm-evaluation-harness. A classifier: accuracy, macro F1, per-class precision/recall/F1 and
    the confusion matrix."""
    from finetune_cli import ui
    from finetune_cli.evaluation import evaluate

    if tasks is not None:
        from finetune_cli.evaluation import tasks as harness

        given = {"--generate": generate, "--data": data, "--base": base, "--stride": stride, "--metrics": metrics}
        given |= {"--max-length": max_length, "--predictions": predictions}
        clash = [flag for flag, value in given.items() if value]
        if clash:
            raise FtuneError(f"--tasks runs the harness's own data and metrics; drop {', '.join(clash)}")
        result = harness.run_tasks(target, tasks, compare_base, num_fewshot, limit, batch_size)
        _emit(result, as_json, ui.tasks_summary)
        return
    if num_fewshot is not None or limit is not None:
        raise FtuneError("--num-fewshot and --limit go with --tasks")
    if generate:
        from finetune_cli.evaluation import predict
        from finetune_cli.inference import generate as gen

        wanted = predict.check_metrics(metrics)
        gen.check_sampling(do_sample, temperature, top_p, seed)
        if base or stride is not None or max_length is not None:
            raise FtuneError(
                "--generate scores the tuned model (and --compare-base the base); drop --base, --stride, --max-length"
            )
        sampling = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "seed": seed}
        with ui.eval_progress() as progress:
            result = evaluate.run_generate(
                target,
                [str(p) for p in data or []],
                compare_base,
                wanted,
                max_new_tokens,
                batch_size,
                str(predictions) if predictions else None,
                sampling,
                progress,
            )
        _emit(result, as_json, ui.generate_summary)
        return
    if metrics is not None:
        raise FtuneError("--metrics needs --generate")
    with ui.eval_progress() as progress:
        result = evaluate.run(
            target,
            [str(p) for p in data or []],
            base,
            compare_base,
            batch_size,
            max_length,
            stride,
            progress,
            str(predictions) if predictions else None,
        )
    _emit(result, as_json, ui.eval_summary)


@app.command()
def classify(
    target: str = typer.Argument(..., help="A classifier: run directory, adapter folder or model folder."),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", help="A text to classify (repeatable)."),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="An image file to classify (repeatable)."),
    data: Optional[str] = typer.Option(
        None, "--data", help='A data file of rows with "text" (or "image"): one JSON line out per row.'
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="With --data: write the JSONL here (a new file), not to stdout."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Rows per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print the predictions as JSON on stdout."),
):
    """The class TARGET gives each text, image or data row, with its probability."""
    from finetune_cli import files
    from finetune_cli.evaluation import classifier

    if sum(map(bool, (text, image, data))) != 1:
        raise FtuneError("give --text, --image or --data (one of them)")
    if data is None:
        if output is not None:
            raise FtuneError("--output goes with --data")
        rows = classifier.classify_texts(target, list(text or []), [str(p) for p in image or []], batch_size)
        if as_json:
            _emit({"predictions": rows}, True)
        else:
            for row in rows:
                sys.stdout.write(f"{row['prediction']}\t{row['probability']:.4f}\n")
        return
    if as_json:
        raise FtuneError("--data writes JSON lines already; drop --json")
    if output is None:
        summary = classifier.classify_file(target, data, sys.stdout, batch_size)
    else:
        out = output.expanduser()
        if out.exists() or out.is_symlink():
            raise FtuneError(f"--output: {out} already exists; ftune never overwrites a file it did not write")
        if not out.parent.is_dir():
            raise FtuneError(f"--output: the folder {out.parent} does not exist")
        with files.atomic_text(out) as stream:
            summary = classifier.classify_file(target, data, stream, batch_size)
    where = f" into {output}" if output else ""
    sys.stderr.write(f"classified {summary['rows']} rows{where} ({summary['rows_per_second']} rows/s)\n")


@app.command("merge-adapter")
def merge_adapter(
    source: str = typer.Argument(..., help="Run directory or adapter folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged model."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model; default: the one the adapter records."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 for the merged weights."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest safetensors shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Fold a LoRA/QLoRA adapter into its full-precision base; write a plain transformers model folder."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise FtuneError(f"--dtype: {dtype!r}; expected float32, bfloat16 or float16")
    from finetune_cli.export import merge

    result = merge.merge(source, str(output), base, dtype, max_shard_size, overwrite)
    _emit(
        result,
        as_json,
        lambda r: sys.stderr.write(f"merged {r['adapter']} into {r['base']} ({dtype}): {r['output']}\n"),
    )


@app.command("export")
def export_(
    target: str = typer.Argument(..., help="Run directory, adapter folder, merged/HF model folder or base name."),
    format_: str = typer.Option(..., "--format", help="Output format: gguf."),
    quant: str = typer.Option("q8_0", "--quant", help="f32 | f16 | bf16 | q8_0 | q5_0 | q5_1 | q4_0 | q4_1."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the .gguf, Modelfile and README."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an output folder an earlier export wrote."),
    check: bool = typer.Option(True, "--check/--no-check", help="Load the file back with transformers and compare."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Export TARGET (adapters merged in float32 first) for llama.cpp, Ollama and LM Studio, and check the file."""
    from finetune_cli.export import gguf_export

    try:
        if format_ != "gguf":
            raise FtuneError(f"--format: {format_!r}; expected gguf")
        result = gguf_export.export(target, str(output), quant, overwrite, check)
    except FtuneError as exc:  # --json: the error (and a failed check's figures) on stdout too
        failed = getattr(exc, "check", None)
        _emit({"error": str(exc), "exit_code": exc.exit_code, "check": failed and failed.dump()}, as_json)
        raise

    def render(r):
        c = r.get("check")
        checked = (
            f"; check: tokenization identical, mean KL divergence {c['kl']:.4f} (<= {c['kl_threshold']}), same top "
            f"token at {c['agreement']:.3f} of {c['confident_positions']} confident positions "
            f"(>= {c['agreement_threshold']})"
            if c
            else "; not checked (--no-check)"
        )
        sys.stderr.write(
            f"wrote {r['file']} ({r['size_bytes'] / 2**20:.1f} MiB, {r['quant']}, {r['seconds']:.1f} s, "
            f"peak RSS {r['peak_rss_mib']} MiB){checked}\n"
            f"run it: llama-cli -m {r['file']} -cnv  |  ollama create NAME -f {r['output']}/Modelfile\n"
        )

    _emit(result, as_json, render)


@app.command()
def generate(
    target: str = typer.Argument(..., help="Run directory, adapter folder, merged/HF model folder or base name."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message before the prompt."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Most tokens to generate."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling probability."),
    do_sample: bool = typer.Option(False, "--do-sample/--greedy", help="Sample, or take the likeliest token."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
):
    """Reply to one prompt with TARGET, rendered with its chat template; the reply streams to stdout."""
    from finetune_cli import rundir
    from finetune_cli.inference import generate as gen

    gen.check_sampling(do_sample, temperature, top_p, seed)
    model, tokenizer = rundir.load(target)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    gen.reply(model, tokenizer, messages, max_new_tokens, do_sample, temperature, top_p, seed, on_text=_stream)
    sys.stdout.write("\n")


@app.command()
def chat(
    target: str = typer.Argument(..., help="Run directory, adapter folder, merged/HF model folder or base name."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message for the conversation."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Most tokens per reply."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling probability."),
    do_sample: bool = typer.Option(False, "--do-sample/--greedy", help="Sample, or take the likeliest token."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
):
    """Keep a conversation going with TARGET in the terminal (an empty line or Ctrl-D ends it)."""
    from finetune_cli import rundir
    from finetune_cli.inference import generate as gen

    gen.check_sampling(do_sample, temperature, top_p, seed)
    model, tokenizer = rundir.load(target)
    messages = [{"role": "system", "content": system}] if system else []
    sys.stderr.write("chat: type a message; an empty line or Ctrl-D ends\n")
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        answer = gen.reply(
            model, tokenizer, messages, max_new_tokens, do_sample, temperature, top_p, seed, on_text=_stream
        )
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer})


@app.command()
def serve(
    targets: List[str] = typer.Argument(
        ...,
        metavar="TARGET",
        help="[NAME=]run directory, adapter folder, merged/HF model folder or base name; NAME defaults to the "
        "folder or model name. Adapters of one base share it; the base is served too, under its own name.",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: a free one)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", help="Require `Authorization: Bearer KEY` on /v1/ (default: $FTUNE_API_KEY, else none)."
    ),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Most requests decoded together."),
    max_queue: int = typer.Option(
        64, "--max-queue", min=0, help="Most requests waiting beyond the batch; more are refused with 503."
    ),
    max_request_bytes: int = typer.Option(
        4 * 1024 * 1024, "--max-request-bytes", min=1, help="Largest request body; a larger one is refused with 413."
    ),
    log_requests: Optional[Path] = typer.Option(
        None,
        "--log-requests",
        metavar="DIR",
        help="Append each finished request (messages, reply, tokens, latency) to DIR/requests.jsonl and take "
        "ratings at /v1/feedback into DIR/feedback.jsonl (default: nothing is stored).",
    ),
    cors_origin: Optional[List[str]] = typer.Option(
        None,
        "--cors-origin",
        metavar="ORIGIN",
        help="Let pages from ORIGIN (e.g. https://intranet.example.com) call the API (repeatable; default: none).",
    ),
):
    """Serve TARGETs behind an OpenAI-compatible HTTP API, with a chat page at / and Prometheus metrics at /metrics."""
    from finetune_cli.serving import server as serving

    key = api_key or os.environ.get("FTUNE_API_KEY") or None
    raise typer.Exit(
        serving.run(
            targets,
            host,
            port,
            key,
            max_batch,
            max_queue,
            _state["debug"],
            max_request_bytes=max_request_bytes,
            log_dir=log_requests,
            cors_origins=list(cors_origin or []),
        )
    )


@app.command()
def feedback(
    log_dir: Path = typer.Argument(..., metavar="DIR", help="The folder of `ftune serve --log-requests DIR`."),
    output: Path = typer.Option(..., "--output", "-o", help="The JSONL file to write (a new file)."),
    fmt: str = typer.Option(
        "kto", "--format", help="kto: rated replies, labelled desirable or not; dpo: preference pairs."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
):
    """Turn the ratings people gave served replies into training data (KTO rows or DPO pairs)."""
    from finetune_cli.data import feedback as rated

    summary = rated.export(log_dir.expanduser(), output.expanduser(), fmt)
    _emit(summary, as_json, lambda s: sys.stderr.write(rated.describe(s) + "\n"))


@app.command()
def validate(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """Check a recipe and every data line without loading weights; exit 1 when a line is bad."""
    from finetune_cli import recipe, ui
    from finetune_cli.training import validate as checks

    report = checks.validate(recipe.load(recipe_path, set_ or []))
    _emit(report, as_json, ui.validate_report)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def preview(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file."),
    index: int = typer.Option(0, "--index", min=0, help="First training example to show (0-based)."),
    count: int = typer.Option(1, "--count", min=1, help="How many examples to show."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print token ids, strings and label flags as JSON."),
):
    """Show training examples as the model sees them: learned tokens highlighted, token boundaries visible."""
    from finetune_cli import recipe, ui
    from finetune_cli.training import validate as checks

    examples = checks.preview(recipe.load(recipe_path, set_ or []), index, count)
    _emit(examples, as_json, ui.preview)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Builtin name, local HF folder, hub id or .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON on stdout."),
):
    """Architecture, size, context, special tokens, chat template and memory of a model (no weights loaded)."""
    from finetune_cli import inspect_model, ui

    info = inspect_model.inspect(model)
    _emit(info, as_json, lambda i: ui.console.print(ui.inspect_table(i)))


@app.command()
def runs(
    dirs: Optional[List[Path]] = typer.Argument(None, metavar="[DIR]...", help="Folders of runs (default: runs/)."),
    sort: str = typer.Option(
        "started", "--sort", help="Column to sort by: started (newest first), name, final_loss, perplexity_after..."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the runs as a JSON list on stdout."),
):
    """Every run under DIR: status (a running one's step and time left), recipe, time, losses, eval figures
    before -> after and task metrics; the best of each column marked."""
    from finetune_cli import ui
    from finetune_cli.reports import runs as listing

    found = listing.sort(listing.find(dirs or [Path("runs")]), sort)
    _emit(found, as_json, ui.runs_table)


@app.command()
def compare(
    paths: List[Path] = typer.Argument(..., metavar="RUN...", help="Two or more run folders."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write a self-contained HTML page here (with the loss curves overlaid)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON on stdout."),
):
    """What differs between the runs' recipes, and their figures side by side with the best marked."""
    from finetune_cli import ui
    from finetune_cli.reports import compare as comparison

    data = comparison.collect(paths)
    if output is not None:
        comparison.write_page(data, output)
        sys.stderr.write(f"wrote {output}\n")
        if not as_json:
            return
    _emit(data, as_json, ui.compare_tables)


def _stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


recipes_app = typer.Typer(help="Shipped recipes: list them, copy one to start from.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
def recipes_list(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout.")):
    """List the shipped recipes with a one-line description."""
    from finetune_cli import recipe, ui

    items = recipe.shipped()
    _emit(items, as_json, ui.recipes_table)


@recipes_app.command("copy")
def recipes_copy(
    name: str = typer.Argument(..., help="Shipped recipe name (see `ftune recipes list`)."),
    dest: str = typer.Argument(..., help="File, or folder (an existing one, or a path ending in /) to copy it to."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
):
    """Copy a shipped recipe to DEST to start from (data paths made absolute)."""
    from finetune_cli import recipe

    path = recipe.copy_shipped(name, dest, overwrite)
    sys.stderr.write(f"copied {name} to {path}; edit it, then: ftune train {path}\n")


# glibc hands freed memory back to the OS at once and maps big blocks afresh, so every training step page-faults
# its activations in again (37 of 163 CPU-seconds of a benchmark run were system time). These keep freed memory
# for reuse; they must be set before the interpreter starts, so `ftune train` / `ftune eval` re-execute themselves
# once with them. FTUNE_MALLOC=0 turns this off. Effect on training measured in BENCHMARKS.md (1.64x).
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**30),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
}


def _tune_malloc(argv: list[str]) -> None:
    if sys.platform != "linux" or "FTUNE_MALLOC" in os.environ or not ({"train", "eval"} & set(argv[1:3])):
        return
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    env = {**os.environ, "FTUNE_MALLOC": "1", **{k: v for k, v in MALLOC_ENV.items() if k not in os.environ}}
    os.execve(sys.executable, [sys.executable, "-m", "finetune_cli", *argv[1:]], env)


def main() -> None:
    _tune_malloc(sys.argv)
    app()
