"""The recipe: a pydantic schema, YAML loading with line numbers, `--set` overrides, the resolved dump."""

from __future__ import annotations

import codecs
import copy
import difflib
import os
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune_cli import files
from finetune_cli.errors import FtuneError


class _Section(BaseModel):
    # No inf or NaN in any float: `.inf` epochs or a NaN learning rate would pass here and fail mid-run.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSection(_Section):
    base: str = "smollm2-135m-instruct"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    chat_template: str | None = None
    trust_remote_code: bool = False


def _check_columns(value: dict) -> dict:
    from finetune_cli.data.formats import FIELDS, MESSAGE_FIELDS

    for key in value:
        if key not in FIELDS + MESSAGE_FIELDS:
            close = difflib.get_close_matches(key, FIELDS + MESSAGE_FIELDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"ftune's fields: {', '.join(FIELDS + MESSAGE_FIELDS)}"
            raise ValueError(f"columns maps ftune's field names to yours; '{key}' is not one of ftune's fields; {hint}")
    return value


MAX_WEIGHT = 1000  # a file repeated more often than this is a typo, and 1e300 copies cannot be made
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
NEWLINE = "\n"

Format = Literal[
    "auto",
    "messages",
    "sharegpt",
    "prompt_completion",
    "alpaca",
    "text",
    "preference",
    "unpaired_preference",
    "classification",
]
Columns = Annotated[dict[str, str], AfterValidator(_check_columns)]


class DataSource(_Section):
    """One data source: a file, a folder, or `hf:ORG/NAME` (with the split, subset and revision to load)."""

    path: str
    format: Format | None = None
    columns: Columns | None = None
    split: str | None = None  # hf: datasets (default train) and save_to_disk folders of several splits
    subset: str | None = None  # hf: the config name
    revision: str | None = None  # hf: a branch, tag or commit

    @field_validator("subset", "revision")
    @classmethod
    def _hub_only(cls, value, info):
        from finetune_cli.data.sources import HUB_PREFIX

        path = info.data.get("path")
        if value is not None and isinstance(path, str) and not path.startswith(HUB_PREFIX):
            raise ValueError(f"{info.field_name} applies to hf: datasets only, not to the local {path}")
        return value


class TrainFile(DataSource):
    weight: float = Field(default=1.0, gt=0, le=MAX_WEIGHT)
    streaming: bool = False  # hf: read as it downloads, never copied whole (data.stream)
    shuffle_buffer: int | None = Field(default=None, ge=0)  # streaming: rows mixed at a time (0: in order)

    @model_validator(mode="after")
    def _streaming(self):
        from finetune_cli.data.sources import HUB_PREFIX

        if self.streaming and not self.path.startswith(HUB_PREFIX):
            raise ValueError(
                f"streaming applies to hf: datasets; {self.path} is a local file, which ftune already reads in "
                "bounded memory: remove streaming"
            )
        if self.shuffle_buffer is not None and not self.streaming:
            raise ValueError(f"shuffle_buffer applies to a streamed source ({self.path}): set streaming: true")
        return self


class DataSection(_Section):
    train: str | list[str | TrainFile]
    eval: str | DataSource | None = None
    eval_split: float | None = Field(default=None, gt=0, lt=1)
    format: Format = "auto"
    columns: Columns = {}
    system_prompt: str | None = None
    max_length: int = Field(default=1024, gt=1)
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    cache: bool = True
    labels: list[str | int] | None = None  # classification: the classes in id order (default: sorted from train)

    @field_validator("labels", mode="before")
    @classmethod
    def _label_names(cls, value):
        if value is None:
            return value
        if not isinstance(value, list):
            raise ValueError("data.labels is a list of the class names, e.g. [negative, positive]")
        from finetune_cli.classification.labels import names_from_recipe

        return names_from_recipe(value)

    @model_validator(mode="after")
    def _one_eval_source(self):
        if self.eval and self.eval_split:
            raise ValueError("set either data.eval or data.eval_split, not both")
        if isinstance(self.train, list) and not self.train:
            raise ValueError("data.train lists no files")
        streamed = self.streamed()
        if streamed and len(self.files()) > 1:
            raise ValueError(
                f"data.train: the streamed {streamed.path} trains alone (weights need each source's "
                "length); give it as the only training source"
            )
        if streamed and self.eval_split:
            raise ValueError(
                "data.eval_split holds out a fraction of each source, and a stream's length is unknown: give the "
                "held-out examples as data.eval"
            )
        return self

    def streamed(self) -> TrainFile | None:
        """The training source read as a stream (`streaming: true`), if any."""
        return next((f for f in self.files() if f.streaming), None)

    def files(self) -> list[TrainFile]:
        """The training files, each with its weight, and its format and columns resolved (the file's own, else
        data.format and data.columns): the one place these defaults are applied."""
        items = self.train if isinstance(self.train, list) else [self.train]
        specs = [TrainFile(path=f) if isinstance(f, str) else f for f in items]
        own = [{"format": s.format or self.format, "columns": s.columns or self.columns} for s in specs]
        return [s.model_copy(update=u) for s, u in zip(specs, own)]

    def eval_source(self) -> DataSource | None:
        """data.eval as a source, its format and columns resolved like a training file's."""
        if self.eval is None:
            return None
        spec = DataSource(path=self.eval) if isinstance(self.eval, str) else self.eval
        return spec.model_copy(update={"format": spec.format or self.format, "columns": spec.columns or self.columns})


class LoraMethod(_Section):
    name: Literal["lora"] = "lora"
    r: int = Field(default=16, gt=0)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] | None = None


class QloraMethod(LoraMethod):
    name: Literal["qlora"] = "qlora"
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class PromptTuningMethod(_Section):
    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(default=20, gt=0)
    init_text: str | None = None


class FullMethod(_Section):
    name: Literal["full"] = "full"


METHODS = {"lora": LoraMethod, "qlora": QloraMethod, "prompt_tuning": PromptTuningMethod, "full": FullMethod}
Method = Annotated[Union[LoraMethod, QloraMethod, PromptTuningMethod, FullMethod], Field(discriminator="name")]


DpoLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
# each preference objective's settings, under TRL's names, with TRL's defaults (filled in when the objective is set)
OBJECTIVE_SETTINGS = {
    "dpo": {"beta": 0.1, "loss_type": ["sigmoid"]},
    "orpo": {"beta": 0.1},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "classification": {"class_weights": "none"},
}


Tracker = Literal["tensorboard", "wandb", "mlflow"]
TRACKERS = ("none", *get_args(Tracker))  # training.report_to's names


class TrainingSection(_Section):
    objective: Literal["sft", "dpo", "orpo", "kto", "classification"] = "sft"
    beta: float | None = Field(default=None, gt=0)
    loss_type: list[DpoLoss] | None = Field(default=None, min_length=1)
    desirable_weight: float | None = Field(default=None, gt=0)
    undesirable_weight: float | None = Field(default=None, gt=0)
    class_weights: Literal["none", "balanced"] | None = None  # classification: "balanced" weighs rare classes up
    epochs: float = Field(default=3, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    gradient_accumulation: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=2.0e-4, gt=0)
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"
    ] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    packing: Literal["auto"] | bool = "auto"
    micro_batch_tokens: Literal["auto"] | Annotated[int, Field(gt=0)] | None = "auto"
    group_by_length: bool = False
    compile: bool = False
    liger: bool = False
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"
    ] = "adamw_torch"
    report_to: Literal["none"] | Tracker | list[Tracker] = "none"  # one tracker or several; see trackers()
    seed: int = Field(default=42, ge=0, le=SEED_MAX)
    logging_steps: int = Field(default=1, gt=0)
    eval_steps: int | None = Field(default=None, gt=0)
    save_steps: int | None = Field(default=100, gt=0)
    save_total_limit: int = Field(default=2, gt=0)
    save_every_epoch: bool = False

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_names(cls, value):
        names = value if isinstance(value, list) else [value]
        for name in names:
            if not isinstance(name, str) or name not in TRACKERS:
                close = difflib.get_close_matches(str(name), TRACKERS, n=1) if isinstance(name, str) else []
                hint = f"did you mean '{close[0]}'?" if close else f"ftune reports to {', '.join(TRACKERS)}"
                raise ValueError(f"'training.report_to': {_short(name)} is not a tracker; {hint}")
        if isinstance(value, list) and "none" in value:
            raise ValueError("'training.report_to': none means no tracker; list the trackers without it")
        return value

    def trackers(self) -> list[str]:
        """The trackers to report to, in order, each once (`none`: none)."""
        names = self.report_to if isinstance(self.report_to, list) else [self.report_to]
        return [n for n in dict.fromkeys(names) if n != "none"]

    @model_validator(mode="after")
    def _objective_settings(self):
        settings = OBJECTIVE_SETTINGS.get(self.objective, {})
        for key in ("beta", "loss_type", "desirable_weight", "undesirable_weight", "class_weights"):
            if key not in settings and getattr(self, key) is not None:
                owners = " / ".join(o for o, s in OBJECTIVE_SETTINGS.items() if key in s)
                raise ValueError(
                    f"training.{key} applies to training.objective {owners}, not {self.objective}; remove it"
                )
            if key in settings and getattr(self, key) is None:
                setattr(self, key, copy.deepcopy(settings[key]))
        return self


class DistributedSection(_Section):
    num_processes: int = Field(default=1, gt=0)
    strategy: Literal["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"] = "ddp"
    config: str | None = None  # the user's own accelerate config file, used instead of the strategy's preset
    num_machines: int = Field(default=1, gt=0)
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int = Field(default=29500, gt=0, lt=65536)

    @model_validator(mode="after")
    def _machines(self):
        if self.num_processes % self.num_machines:
            raise ValueError(
                "distributed.num_processes counts all machines' processes: make it a multiple of num_machines"
            )
        if self.machine_rank >= self.num_machines:
            raise ValueError("distributed.machine_rank counts from 0: it must be below num_machines")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("distributed.main_process_ip: set the address of machine_rank 0 for a multi-machine run")
        return self


class OutputSection(_Section):
    dir: str | None = None


class Recipe(_Section):
    model: ModelSection = ModelSection()
    data: DataSection
    method: Method = LoraMethod()
    training: TrainingSection = TrainingSection()
    distributed: DistributedSection = DistributedSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _streaming(self):
        streamed, t = self.data.streamed(), self.training
        if streamed is None:
            return self
        if t.max_steps is None:
            raise ValueError(
                f"training.max_steps: the streamed {streamed.path} has no known length, so epochs cannot be "
                "counted; set training.max_steps"
            )
        if t.objective != "sft":
            raise ValueError(f"streaming: true reads SFT data; training.objective {t.objective} reads its data whole")
        if t.group_by_length:
            raise ValueError("training.group_by_length sorts by length, which a stream cannot: remove it")
        if self.distributed.num_processes > 1:
            raise ValueError("a streamed source trains on one process for now: set distributed.num_processes: 1")
        return self

    @model_validator(mode="after")
    def _classification(self):
        if self.data.labels is not None and self.training.objective != "classification":
            raise ValueError(
                "data.labels applies to training.objective: classification; remove it or set the objective"
            )
        if self.training.objective == "classification" and self.method.name == "prompt_tuning":
            raise ValueError(
                "method prompt_tuning cannot train a classifier: PEFT feeds the virtual tokens as embeddings, so the "
                "label head cannot find each padded row's last token; use method lora, qlora or full"
            )
        return self


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate and resolve a recipe file; raise FtuneError with file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise FtuneError(f"{path}: recipe file not found")
    text = _read_text(path)
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FtuneError(f"{where}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise FtuneError(f"{path}: YAML nested too deeply to read; a recipe needs two levels") from None
    except ValueError:  # PyYAML reads integers with int(), which refuses more than sys.get_int_max_str_digits()
        long = re.search(rf"[0-9_]{{{sys.get_int_max_str_digits()},}}", text)
        where = f"{path}:{text.count(NEWLINE, 0, long.start()) + 1}" if long else str(path)
        raise FtuneError(f"{where}: a number too long to read; shorten it") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FtuneError(
            f"{path}: a recipe is a YAML mapping with sections model, data, method, training, distributed, output"
        )
    set_keys = set()
    for item in overrides:
        set_keys.add(_apply_override(raw, item))
    _check_text(raw, path, lines, set_keys)
    recipe = _validate(raw, path, lines, set_keys)
    if recipe.output.dir is None:
        recipe.output.dir = f"runs/{path.stem}"
    return _resolve_paths(recipe, path.parent)


def _read_text(path: Path) -> str:
    """The recipe as text: UTF-8, with or without the byte order mark that some editors write."""
    try:
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as exc:
        raise FtuneError(f"{path}: cannot read the recipe: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FtuneError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the recipe as UTF-8"
        ) from None


def _check_text(raw: dict, path: Path, lines: dict, set_keys: set[str]) -> None:
    """Strings that are no Unicode text (a YAML "\\ud800" escape, undecodable bytes in --set) would crash the
    tokenizer mid-run: refuse them here, naming the key. Walked without recursion: YAML aliases can loop."""
    stack, seen = [((), raw)], set()
    while stack:
        loc, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                key = ".".join(loc)
                where = "--set" if key in set_keys else _where(path, lines, loc)
                raise FtuneError(f"{where}: '{key}' holds a character that is not Unicode text; retype it") from None
        elif isinstance(value, (dict, list)) and id(value) not in seen:
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((loc + (str(k),), v) for k, v in items)


def _validate(raw: dict, path: Path, lines: dict, set_keys: set[str]) -> Recipe:
    method = raw.get("method")
    if isinstance(method, dict):
        problem = _check_method(method)
        if problem:
            key, message = problem
            where = "--set" if key in set_keys else _where(path, lines, tuple(key.split(".")))
            raise FtuneError(f"{where}: {message}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        # A union (data.train: a path or a list of files) reports each branch: the deepest error is the real one.
        # the deepest error; of a union's branches, a validator's own words over "expected a valid string"
        err = max(exc.errors(), key=lambda e: (len(e["loc"]), e["type"] == "value_error"))
        loc = tuple(str(p) for p in err["loc"] if not _UNION_TAG.fullmatch(str(p)))
        if loc[:1] == ("method",) and len(loc) > 1 and loc[1] in METHODS:
            loc = loc[:1] + loc[2:]  # drop the union's tag from the key path
        key = ".".join(loc)
        where = "--set" if key in set_keys else _where(path, lines, loc)
        raise FtuneError(f"{where}: {_describe(err, loc)}") from None


_UNION_TAG = re.compile(r"str|TrainFile|DataSource|.*\[.*")


def _check_method(method: dict) -> tuple[str, str] | None:
    """A missing name means lora; a field of another method says which method it belongs to."""
    name = method.setdefault("name", "lora")
    if not isinstance(name, str) or name not in METHODS:  # a list or mapping is no dict key
        return "method.name", f"'method.name' is {_short(name)}; expected one of {', '.join(map(repr, METHODS))}"
    fields = METHODS[name].model_fields
    for key in map(str, method):  # YAML keys may be numbers
        if key in fields:
            continue
        owners = [m for m, cls in METHODS.items() if key in cls.model_fields]
        if owners:
            return f"method.{key}", f"'method.{key}' belongs to method {' / '.join(owners)}, not {name}; remove it"
        close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
        hint = f"did you mean 'method.{close[0]}'?" if close else f"{name} takes: {', '.join(fields)}"
        return f"method.{key}", f"unknown key 'method.{key}'; {hint}"
    return None


def _describe(err: dict, loc: tuple[str, ...]) -> str:
    key = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        fields = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], fields, n=1, cutoff=0.6)
        hint = f"did you mean '{'.'.join(loc[:-1] + (close[0],))}'?" if close else f"known keys: {', '.join(fields)}"
        return f"unknown key '{key}'; {hint}"
    if kind == "missing":
        return f"missing required key '{key}'"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"'{key}' is {_short(err['input'])}; expected one of {expected}"
    if kind == "value_error" or not loc:  # our own checks say what is wrong in full
        return err["msg"].removeprefix("Value error, ")
    if kind == "int_parsing_size":
        return f"'{key}' is {_short(err['input'])}: expected an integer; this one is too large"
    if loc[-1] == "weight" and kind == "less_than_equal":
        return f"'{key}' is {_short(err['input'])}: a weight repeats a file's examples; use at most {MAX_WEIGHT}"
    msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    return f"'{key}' is {_short(err['input'])}: {msg}"


def _short(value) -> str:
    """A value as the error shows it: a 5000-digit number or a pasted essay would hide the message."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    if loc[:2] == ("data", "train"):
        return list(TrainFile.model_fields)
    if loc[:2] == ("data", "eval"):
        return list(DataSource.model_fields)
    model: type[BaseModel] = Recipe
    for part in loc:
        model = model.model_fields[part].annotation
    return list(model.model_fields)


def _key_lines(node, prefix=(), above=frozenset()) -> dict[tuple[str, ...], int]:
    """Map each key path of a composed YAML document to its 1-based line."""
    out = {}
    if id(node) in above:  # an alias inside its own anchor (`&a [*a]`): the schema refuses it later
        return out
    above = above | {id(node)}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            loc = prefix + (str(key_node.value),)
            out[loc] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, loc, above))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (str(i),)] = item.start_mark.line + 1
            out.update(_key_lines(item, prefix + (str(i),), above))
    return out


def _where(path: Path, lines: dict, loc: tuple[str, ...]) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return f"{path}:{lines[loc[:n]]}"
    return str(path)


def _apply_override(raw: dict, item: str) -> str:
    """Apply one `dotted.key=value` to the raw recipe; return the key.

    The value is read as a YAML scalar (`1e-4`, `true`, `[q_proj, v_proj]`), except for a key the schema types
    as a string: there YAML would drop `#...` as a comment or read `a: b` as a mapping, so the value is taken
    as typed. YAML's null (empty, `null`, `~`) is null either way: `--set data.eval=null` unsets the eval file."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FtuneError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.learning_rate=1e-4")
    parts = key.split(".")
    if value.strip() in YAML_NULL:
        parsed = None
    elif _string_key(parts):
        parsed = value
    else:
        try:
            parsed = yaml.safe_load(value)
        except (yaml.YAMLError, ValueError, RecursionError):  # the schema then names the key and what it expects
            parsed = value
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise FtuneError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = parsed
    return key


YAML_NULL = ("", "~", "null", "Null", "NULL")  # what YAML reads as null


def _string_key(parts: list[str]) -> bool:
    """Whether the schema types this key as a string (or null); a method field counts if any method has it so."""
    sections: list[type[BaseModel]] = [Recipe]
    for i, part in enumerate(parts):
        types_ = [cls.model_fields[part].annotation for cls in sections if part in cls.model_fields]
        if not types_:
            return False
        if i == len(parts) - 1:  # data.eval: a path or a mapping; on the command line, a path as typed
            return any(t is str or (_is_union(t) and set(get_args(t)) - _SECTIONS == {str, type(None)}) for t in types_)
        options = [a for t in types_ for a in ((t,) if not _is_union(t) else get_args(t))]
        sections = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
    return False


_SECTIONS = {DataSource}


def _is_union(annotation) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _resolve_paths(recipe: Recipe, folder: Path) -> Recipe:
    """Data and template paths are relative to the recipe's folder; written back absolute. `~` is expanded in
    every path, output.dir included (which stays relative to the working directory); environment variables not."""

    def resolve(p: str | None) -> str | None:
        return None if p is None else str((folder / Path(p).expanduser()).resolve())

    def data(p: str) -> str:
        from finetune_cli.data.sources import resolve_hub

        return resolve_hub(p, folder) if p.startswith("hf:") else resolve(p)

    d = recipe.data
    for spec in [*(d.train if isinstance(d.train, list) else []), d.eval]:
        if isinstance(spec, DataSource):
            spec.path = data(spec.path)
    if isinstance(d.train, list):
        d.train = [data(f) if isinstance(f, str) else f for f in d.train]
    else:
        d.train = data(d.train)
    if isinstance(d.eval, str):
        d.eval = data(d.eval)
    recipe.distributed.config = resolve(recipe.distributed.config)
    recipe.output.dir = os.path.expanduser(recipe.output.dir)  # not resolved: relative to the working directory
    from finetune_cli.data.templates import NAMES

    if recipe.model.chat_template and recipe.model.chat_template not in NAMES:
        recipe.model.chat_template = resolve(recipe.model.chat_template)
    base = Path(recipe.model.base).expanduser()
    local = folder / base
    if base.suffix == ".gguf" or recipe.model.base.startswith((".", "/", "~")) or local.exists():
        recipe.model.base = str(local.resolve())
    return recipe


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default filled in."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


SHIPPED = Path(__file__).resolve().parent.parent / "recipes"


def shipped() -> list[dict]:
    """Shipped recipes: name, the first comment line as description, path."""
    out = []
    for path in sorted(SHIPPED.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        out.append({"name": path.stem, "description": first.lstrip("# ").strip(), "path": str(path)})
    return out


def copy_shipped(name: str, dest: str | Path, overwrite: bool = False) -> Path:
    """Copy a shipped recipe, comments kept, with its relative data paths made absolute so it runs anywhere.

    `dest` is a folder when it is one or ends in `/` (created if needed), else the file to write. Only a recipe
    file (.yaml, .yml) is ever replaced, and only with `overwrite`."""
    source = SHIPPED / f"{name.removesuffix('.yaml')}.yaml"
    if not source.is_file():
        names = ", ".join(r["name"] for r in shipped())
        raise FtuneError(f"no shipped recipe '{name}'; choose one of: {names}")
    as_folder = str(dest).endswith(("/", os.sep))  # Path() drops the trailing slash: look before converting
    dest = Path(dest)
    if as_folder or dest.is_dir():
        if dest.exists() and not dest.is_dir():
            raise FtuneError(f"{dest} is a file, not a folder; give a folder or a new file name")
        dest = dest / source.name
    for parent in dest.parents:
        if parent.exists() and not parent.is_dir():
            raise FtuneError(f"{parent} is a file, not a folder; choose another destination")
    if dest.is_dir():
        raise FtuneError(f"{dest} is a folder; choose another destination")
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise FtuneError(f"{dest} exists; pass --overwrite or choose another destination")
        if dest.suffix not in (".yaml", ".yml") or not dest.is_file():
            raise FtuneError(f"{dest} is not a recipe file (.yaml); ftune replaces only those, even with --overwrite")

    def absolute(match: re.Match) -> str:
        value = match.group(2)
        local = SHIPPED / value
        return f"{match.group(1)}{local.resolve()}" if not Path(value).is_absolute() and local.exists() else match[0]

    text = re.sub(
        r"^(\s+(?:train|eval|chat_template):\s*)(\S+)", absolute, source.read_text(encoding="utf-8"), flags=re.M
    )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(dest, text)
    except OSError as exc:
        raise FtuneError(f"{dest}: cannot write the recipe: {exc.strerror or exc}") from None
    return dest
