"""What commands produce, as types: run.json (and `train --json`), an eval result (eval.json and `eval --json`),
and the validate report. Files and `--json` are written from the same model, so they cannot drift apart; a key
that is not declared here is an error when it is written, not a surprise for whoever reads it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def dump(self) -> dict:
        """The JSON-ready dict: keys that were never set are left out (as before types: e.g. `reason` only once
        a run stopped, `resumed_from` only for a resumed run)."""
        return self.model_dump(mode="json", exclude_unset=True)


class Score(_Result):
    """Corpus perplexity: exp(nll / tokens) over every scored token."""

    tokens: int
    nll: float
    loss: float
    perplexity: float


class PairScore(_Result):
    """Pair metrics on preference data: the chosen reply's summed log-probability minus the rejected one's."""

    pairs: int
    accuracy: float  # fraction of pairs where chosen is more likely
    margin: float  # mean difference
    chosen_logps: float
    rejected_logps: float


class ClassScore(_Result):
    """A classifier on labelled data (classification.metrics.report: the same figures as scikit-learn's)."""

    examples: int
    loss: float | None  # mean cross-entropy of the reference classes
    accuracy: float
    macro_f1: float
    labels: list[str]  # class names in id order: the rows and columns of `confusion`
    per_class: dict[str, dict[str, float | int]]  # name -> precision, recall, f1, support
    confusion: list[list[int]]  # [reference][prediction] counts
    worst: dict[str, Any] | None = None  # the class with the lowest F1, and what its rows were taken for


class Change(_Result):
    perplexity: float
    relative: float


class PairChange(_Result):
    accuracy: float
    margin: float


class EvalResult(_Result):
    kind: Literal["classification"] | None = None  # set for a classifier's eval (perplexity and pairs: unset)
    target: str
    base: str
    data: list[str]
    data_sha256: list[str] | None = None
    context: int | None  # None for image classifiers
    stride: int | None  # None for preference pairs and classifiers (scored whole, never in windows)
    results: dict[str, Score | PairScore | ClassScore]  # "model", or "base" and/or "tuned"
    change: Change | PairChange | None = None
    predictions: str | None = None  # a classifier's predictions file


class GenerateEval(_Result):
    """`ftune eval --generate`: task metrics of generated answers, per model ("model", or "base"/"tuned")."""

    kind: Literal["generate"]
    target: str
    base: str
    data: list[str]
    data_sha256: list[str] | None = None
    examples: int
    max_new_tokens: int
    greedy: bool
    metrics: list[str]
    results: dict[str, dict[str, float]]
    change: dict[str, float] | None = None
    tokens_per_second: dict[str, float]
    predictions: str | None = None


class TasksEval(_Result):
    """`ftune eval --tasks`: lm-evaluation-harness results per model ("model", or "base"/"tuned"), each metric named
    `task metric` (the harness's names; a filter other than `none` kept after a comma)."""

    kind: Literal["tasks"]
    target: str
    base: str
    data: list[str]  # the --tasks entries as given (names and YAML paths): eval.json keeps one result per list
    harness: str  # lm_eval's version
    tasks: list[str]
    num_fewshot: dict[str, int | None]
    limit: float | None = None
    samples: dict[str, int | None]
    metrics: list[str]
    higher_is_better: dict[str, bool]
    results: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]]
    change: dict[str, float] | None = None


class Sample(_Result):
    prompt: str
    base: str
    tuned: str


class Distributed(_Result):
    processes: int
    strategy: str
    effective_batch_size: int
    micro_batch_tokens: int | None


class RunInfo(_Result):
    """run.json: the run's status with the reason it stopped, what it trained on, and its results."""

    status: Literal["running", "completed", "interrupted", "failed", "unfinished"]
    reason: str | None = None
    resumed_from: str | None = None
    started: str | None = None
    versions: dict[str, str | None] = {}
    device: str | None = None  # "cuda (NVIDIA H200)" or "cpu (avx2)"
    precision: str | None = None  # what training.precision resolved to: fp32, bf16 or fp16
    distributed: Distributed | None = None
    data: dict[str, Any] = {}  # train: files (path, format, weight, sha256...) and token counts; eval: path or split
    seconds: float | None = None
    method: str | None = None
    objective: str | None = None
    steps: int | None = None
    train_seconds: float | None = None
    train_loss: float | None = None
    final_loss: float | None = None
    first_loss: float | None = None
    tokens_seen: int | None = None
    peak_gpu_memory_mib: int | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    eval_before: Score | PairScore | ClassScore | None = None
    eval_after: Score | PairScore | ClassScore | None = None
    samples: list[Sample] = []
    artifact: str | None = None


class ValidateReport(_Result):
    recipe: str | None
    model: str
    files: list[dict[str, Any]]
    errors: dict[str, list[dict[str, str]]]  # the first bad rows of each kind (validate.SHOWN)
    error_counts: dict[str, int]  # how many of each kind
    error_count: int
    warnings: list[str]
    stats: dict[str, Any]
    ok: bool


class ExportCheck(_Result):
    """The GGUF read back by transformers' loader vs the source model on the probe text: tokenization, mean KL
    divergence of the next-token distributions, top-1 agreement where the source is confident (no near tie)."""

    tokens_equal: bool
    positions: int
    kl: float
    kl_threshold: float
    confident_positions: int
    agreement: float
    agreement_threshold: float
    passed: bool


class ExportResult(_Result):
    """`ftune export` (and its --json)."""

    output: str
    file: str
    format: str
    quant: str
    architecture: str
    base: str
    method: str | None = None
    template: str | None = None  # the builtin family the chat template renders like (Modelfile TEMPLATE), or None
    end_of_turn: list[str]
    tensors: int
    size_bytes: int
    seconds: float
    peak_rss_mib: int
    check: ExportCheck | None = None
