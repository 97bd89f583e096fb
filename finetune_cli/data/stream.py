"""A streamed training source (`streaming: true` on an `hf:` source): read as it downloads, never copied whole.

Each row is parsed (`jsonl.rows`) and masked (`masking`) as the whole-file path does, one at a time, on the
trainer's data loader; a shuffle buffer mixes them (datasets' algorithm: the next example takes a random place
among `shuffle_buffer` waiting ones). A stream's length is unknown, so training.max_steps says how long to train;
a stream that ends before that starts again, shuffled anew (the trainer's next epoch). A bad row stops the run
with the row named, as `ftune validate` would name it."""

from __future__ import annotations

from collections.abc import Iterator

from finetune_cli.data import jsonl, masking, sources
from finetune_cli.data.formats import LineError
from finetune_cli.data.store import Records
from finetune_cli.errors import FtuneError

SHUFFLE_BUFFER = 10_000  # rows mixed at a time unless the source says (datasets' examples use 1,000 to 10,000)
PEEK = 64  # rows read before training starts: the format, the template and the first rows checked up front


def load(data) -> tuple[Records, Records, list[dict]]:
    """What `jsonl.load` returns, for a recipe whose training source is streamed: its first records (what the
    checks before training look at), the eval records (data.eval, read whole) and the file's info (no counts)."""
    spec = data.streamed()
    first = Records.from_list(peek(spec, data.system_prompt))
    if not first:
        raise FtuneError(f"{spec.path}: no examples (the stream is empty)")
    source = data.eval_source()
    evals = jsonl.read(source, source.format, source.columns, data.system_prompt) if source else Records()
    info = {"path": spec.path, "format": first[0]["format"], "detected": spec.format == "auto", "weight": 1.0}
    return first, evals, [{**info, "examples": None, "used": None, "streaming": True}]


def peek(spec, system_prompt: str | None, count: int = PEEK) -> list[dict]:
    """The stream's first `count` records; a bad row among them raises its error."""
    first = []
    for item in jsonl.rows(sources.open_source(spec), spec.format, spec.columns, system_prompt):
        if isinstance(item, LineError):
            raise item
        first.append(item)
        if len(first) == count:
            break
    return first


class Examples:
    """The trainer's examples from a streamed source: `{"input_ids", "labels"}` as `masking.tokenize_all` makes
    them, in the stream's order (`__iter__`) or shuffled as training reads them (`dataset()`), with counts of what
    was tokenized, over all passes (examples, truncated, dropped, tokens, learned tokens, passes) for run.json:
    the rows training drew, those the shuffle buffer held when it stopped, and the trainer's look at the first."""

    def __init__(self, spec, tokenizer, max_length: int, train_on: str, system_prompt: str | None, seed: int):
        self.spec, self.tokenizer, self.max_length, self.train_on = spec, tokenizer, max_length, train_on
        self.system_prompt, self.seed = system_prompt, seed
        self.buffer = SHUFFLE_BUFFER if spec.shuffle_buffer is None else spec.shuffle_buffer
        self.counts = dict.fromkeys(("examples", "truncated", "dropped", "tokens", "learned_tokens", "passes"), 0)

    def dataset(self):
        """The trainer's `datasets.IterableDataset`, shuffled by datasets' buffer (each epoch anew, from the seed
        and the epoch the trainer sets)."""
        import datasets

        ids = datasets.Sequence(datasets.Value("int32"))
        # the columns named up front: TRL reads them off the first example otherwise, a shuffle buffer's fill each
        features = datasets.Features({"input_ids": ids, "labels": ids})
        ds = datasets.IterableDataset.from_generator(_generate, features=features, gen_kwargs={"stream": self})
        return ds.shuffle(seed=self.seed, buffer_size=self.buffer) if self.buffer > 1 else ds

    def __iter__(self) -> Iterator[dict]:
        self.counts["passes"] += 1
        c = self.counts
        rows = jsonl.rows(sources.open_source(self.spec), self.spec.format, self.spec.columns, self.system_prompt)
        for item in rows:
            if isinstance(item, LineError):
                raise item
            part, error = masking.tokenize_chunk(self.tokenizer, [item], self.max_length, self.train_on)
            if error:
                raise FtuneError(error)
            made, truncated, dropped = part
            seen = {"examples": len(made), "truncated": truncated, "dropped": dropped}
            for key, n in {**seen, "tokens": made.tokens(), "learned_tokens": made.learned()}.items():
                c[key] += n
            yield from (made[i] for i in range(len(made)))


def _generate(stream: Examples) -> Iterator[dict]:
    yield from stream
