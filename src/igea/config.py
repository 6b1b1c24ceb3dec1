"""YAML configs -> typed dataclasses, validated at load.

A config has five sections: `model`, `data`, `training`, `generation`, `eval` (plus an optional `card`).
`training` is passed through to `transformers.TrainingArguments`, so any of its fields is valid there.
Every problem is raised as one `ConfigError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import glob
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from igea.errors import ConfigError

SAMPLE_CORPUS = "igea:sample"
"""`data.path` value that names the Italian biomedical sample corpus shipped inside the package."""

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".gz", ".zst", ".bz2", ".xz")

# The card's recipe (Igea-1B): the defaults of the `training:` section. Anything else falls back to
# transformers' own TrainingArguments defaults.
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 2,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "adam_epsilon": 1e-8,
    "weight_decay": 0.0,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.02,
    "num_train_epochs": 1.0,
    "seed": 42,
    "eval_strategy": "steps",
    "eval_steps": 5000,
    "logging_steps": 5000,
    "save_strategy": "steps",
    "save_steps": 5000,
    "report_to": "none",
}

# Keys igea adds to the `training:` section on top of TrainingArguments' own fields.
IGEA_TRAINING_KEYS: dict[str, type | tuple[type, ...]] = {
    "warmup_ratio": float,  # transformers 5 folds it into a float `warmup_steps` in [0, 1)
    "total_train_batch_size": int,  # derive gradient accumulation from the world size
    "stop_on_nonfinite_loss": bool,  # stop the run when the training loss is NaN or inf
}


@dataclass
class TinyModelConfig:
    """Shape of a tiny Mistral built locally (with a BPE tokenizer trained on the corpus)."""

    vocab_size: int = 1024
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 192
    max_position_embeddings: int = 1024
    seed: int = 0


@dataclass
class ModelConfig:
    """The base model: a hub id or a local directory, or a tiny Mistral built on the fly."""

    name_or_path: str | None = None
    tiny: TinyModelConfig | None = None
    revision: str | None = None
    dtype: str = "auto"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class SourceConfig:
    """One corpus in a weighted mixture (`data.sources`)."""

    path: str | list[str]
    weight: float = 1.0
    text_column: str | None = None
    name: str | None = None
    split: str = "train"


@dataclass
class DataConfig:
    """Where the corpus comes from and how it becomes fixed-length blocks of token ids."""

    path: str | list[str] | None = None
    sources: list[SourceConfig] = field(default_factory=list)
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    text_column: str = "text"
    validation_path: str | list[str] | None = None
    validation_split: float | int = 0.05
    max_documents: int | None = None
    min_chars: int = 1
    encoding_errors: str = "strict"
    block_size: int = 2048
    document_boundary: str = "eos"
    packing: str = "blocks"
    streaming: bool = False
    token_budget: int | None = None
    shuffle_buffer: int = 10000
    num_proc: int | None = None
    cache_dir: str | None = None
    seed: int | None = None


@dataclass
class GenerationConfig:
    """Sampling parameters for `igea.generate` and the samples printed at the end of a run."""

    prompts: list[str] = field(default_factory=lambda: ["Il fegato è "])
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    seed: int | None = 42


@dataclass
class EvalConfig:
    """Evaluation: held-out metrics before training, and multiple-choice benchmarks after it."""

    before_training: bool = True
    tasks: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 8


@dataclass
class CardConfig:
    """Text of the model card written at the end of a run."""

    title: str | None = None
    description: str | None = None
    language: list[str] = field(default_factory=lambda: ["it"])
    license: str = "apache-2.0"
    tags: list[str] = field(default_factory=lambda: ["pretrained", "biomedical", "text-generation"])
    datasets: list[str] = field(default_factory=list)
    risks: str | None = None


@dataclass
class IgeaConfig:
    """A whole run: what the YAML file says, typed and validated."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: dict[str, Any] = field(default_factory=dict)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    card: CardConfig = field(default_factory=CardConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that `config_from_dict` turns back into the same config (saved with each run)."""
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[Any, ...]] = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.encoding_errors": ("strict", "replace", "ignore"),
    "data.document_boundary": ("eos", "special_tokens"),
    "data.packing": ("blocks", "documents"),
}


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> IgeaConfig:
    """Read a YAML config, apply dotted `key=value` overrides, and validate everything.

    >>> cfg = load_config("configs/demo.yaml", ["training.learning_rate=1e-4"])
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config: '{path}' is a directory; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"config: file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config: '{path}' is not valid YAML{line}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: '{path}' is not UTF-8 text") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: '{path}' must be a mapping of sections, got a {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    raw.setdefault("training", {})
    if isinstance(raw["training"], dict):
        raw["training"].setdefault("output_dir", str(Path("runs") / path.stem))
    return config_from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`1e-4` becomes a number later)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}': expected KEY=VALUE with a dotted key, e.g. training.learning_rate=1e-4")
    parts = key.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"override '{item}': the key must name a section and a field, e.g. data.block_size=512")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def config_from_dict(raw: dict[str, Any]) -> IgeaConfig:
    """Build and validate an `IgeaConfig` from a plain dict (a parsed YAML file)."""
    cfg = build_section(IgeaConfig, raw, "")
    cfg.training = _validate_training(cfg.training)
    _check_values(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Generic dataclass builder with type checks


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """The dataclass `cls` from a mapping, every value type-checked; errors name `prefix` + the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key(f"{prefix}{key}", str(key), names))
    values = {name: _coerce(raw[name], hints[name], f"{prefix}{name}") for name in names if name in raw}
    try:
        return cls(**values)
    except TypeError as err:  # a required field is missing
        missing = str(err).split("argument")[-1].strip(": '")
        raise ConfigError(f"{prefix.rstrip('.')}: missing required key '{missing}'") from None


def _unknown_key(full_key: str, key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"allowed: {', '.join(allowed)}"
    return f"unknown key '{full_key}'; {hint}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint, converting where YAML is loose (`5e-5` is a string in YAML 1.1)."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:  # `SchedulerType | str`: the string must still be one of the enum's values
            return _coerce(value, enums[0], key)
        candidates = [a for a in args if a is not type(None)]
        exact = [a for a in candidates if type(value) is a]  # `float | int` keeps an int an int
        for arg in exact + candidates:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, f"{key}.")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if isinstance(value, hint):
            return value.value
        if value is False and "no" in allowed:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    return _coerce_scalar(value, hint, key)


def _coerce_scalar(value: Any, hint: type, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    if hint is list:
        return "a list"
    if hint is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


# ----------------------------------------------------------------------------------------------------------
# The training section: TrainingArguments pass-through


def _training_argument_hints() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def _validate_training(section: dict[str, Any]) -> dict[str, Any]:
    hints = _training_argument_hints()
    allowed = sorted(set(hints) | set(IGEA_TRAINING_KEYS))
    checked = dict(TRAINING_DEFAULTS)
    for key, value in section.items():
        full = f"training.{key}"
        if key in IGEA_TRAINING_KEYS:
            hint = IGEA_TRAINING_KEYS[key]
            checked[key] = None if value is None else _coerce_scalar(value, hint, full)
        elif key in hints:
            checked[key] = _coerce(value, hints[key], full)
        else:
            raise ConfigError(_unknown_key(full, key, allowed))
    if "warmup_steps" in section and "warmup_ratio" not in section:
        checked.pop("warmup_ratio")
    _check_training_ranges(checked)
    return checked


def _check_training_ranges(t: dict[str, Any]) -> None:
    positive = ["learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "num_train_epochs", "adam_epsilon"]
    for key in positive:
        if key in t and t[key] is not None and t[key] <= 0:
            raise ConfigError(f"training.{key}: {t[key]!r} is not allowed; it must be greater than 0")
    for key in ("adam_beta1", "adam_beta2"):
        if key in t and not 0 <= t[key] < 1:
            raise ConfigError(f"training.{key}: {t[key]!r} is not allowed; it must be in [0, 1)")
    if t.get("weight_decay", 0) < 0:
        raise ConfigError(f"training.weight_decay: {t['weight_decay']!r} is not allowed; it must be >= 0")
    ratio = t.get("warmup_ratio")
    if ratio is not None and not 0 <= ratio < 1:
        raise ConfigError(f"training.warmup_ratio: {ratio!r} is not allowed; it must be in [0, 1)")
    if t.get("max_steps", -1) == 0 or t.get("max_steps", -1) < -1:
        raise ConfigError(f"training.max_steps: {t['max_steps']!r} is not allowed; use -1 (epochs) or a positive count")
    total = t.get("total_train_batch_size")
    if total is not None and total <= 0:
        raise ConfigError(f"training.total_train_batch_size: {total!r} is not allowed; it must be greater than 0")
    if not t.get("output_dir"):
        raise ConfigError("training.output_dir: must be set to the directory of the run")


# ----------------------------------------------------------------------------------------------------------
# Cross-field checks


def _check_values(cfg: IgeaConfig) -> None:
    for dotted, allowed in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not allowed; choose one of {', '.join(allowed)}")
    m, d, g, e = cfg.model, cfg.data, cfg.generation, cfg.eval
    if (m.name_or_path is None) == (m.tiny is None):
        raise ConfigError("model: set exactly one of 'model.name_or_path' (hub id or directory) and 'model.tiny'")
    if m.name_or_path is not None and looks_local(m.name_or_path) and not Path(m.name_or_path).is_dir():
        raise ConfigError(f"model.name_or_path: directory '{m.name_or_path}' does not exist")
    if d.path is None and not d.sources:
        raise ConfigError("data: set 'data.path' (hub id, file, glob or directory) or 'data.sources'")
    if d.path is not None and d.sources:
        raise ConfigError("data: set either 'data.path' or 'data.sources', not both")
    for key, paths in [("data.path", d.path), ("data.validation_path", d.validation_path)] + [
        (f"data.sources[{i}].path", s.path) for i, s in enumerate(d.sources)
    ]:
        if paths is not None:
            resolve_local_files(paths, key)
    for i, s in enumerate(d.sources):
        if s.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight: {s.weight!r} is not allowed; it must be greater than 0")
    if d.streaming:
        _check_streaming(d, cfg.training)
    if d.block_size < 2:
        raise ConfigError(f"data.block_size: {d.block_size!r} is not allowed; it must be at least 2")
    vs = d.validation_split
    if isinstance(vs, float) and not 0 <= vs < 1 or isinstance(vs, int) and vs < 0:
        raise ConfigError(f"data.validation_split: {vs!r} is not allowed; use a fraction in [0, 1) or a count >= 0")
    for key, value in [("data.min_chars", d.min_chars), ("data.max_documents", d.max_documents),
                       ("data.token_budget", d.token_budget), ("data.num_proc", d.num_proc),
                       ("eval.limit", e.limit), ("eval.num_fewshot", e.num_fewshot)]:
        if value is not None and value < 0:
            raise ConfigError(f"{key}: {value!r} is not allowed; it must be >= 0")
    check_generation_values(g, "generation.")
    from igea.tasks import check_task_names  # igea.tasks builds on this module

    check_task_names(e.tasks)
    if e.batch_size < 1:
        raise ConfigError(f"eval.batch_size: {e.batch_size!r} is not allowed; it must be at least 1")


def _check_streaming(d: DataConfig, training: dict[str, Any]) -> None:
    """A streamed corpus has no length: the run is sized by steps or tokens, the validation set by a count."""
    if isinstance(d.validation_split, float) and d.validation_split > 0 and d.validation_path is None:
        raise ConfigError(
            f"data.validation_split: {d.validation_split!r} is a fraction, which a streamed corpus cannot take; "
            "give a count of documents (e.g. 500), 0, or data.validation_path"
        )
    has_steps = training.get("max_steps", -1) > 0
    if has_steps == (d.token_budget is not None):
        raise ConfigError(
            "data.streaming: size the run with exactly one of training.max_steps and data.token_budget "
            "(a streamed corpus has no length)"
        )


def check_generation_values(g: GenerationConfig, prefix: str = "") -> None:
    """Range checks shared by the config loader and per-call overrides of `Generator.generate`."""
    if g.max_new_tokens < 1:
        raise ConfigError(f"{prefix}max_new_tokens: {g.max_new_tokens!r} is not allowed; it must be at least 1")
    if g.temperature <= 0:
        raise ConfigError(f"{prefix}temperature: {g.temperature!r} is not allowed; it must be greater than 0")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"{prefix}top_p: {g.top_p!r} is not allowed; it must be in (0, 1]")
    if g.top_k < 0:
        raise ConfigError(f"{prefix}top_k: {g.top_k!r} is not allowed; it must be >= 0")
    if g.repetition_penalty <= 0:
        raise ConfigError(
            f"{prefix}repetition_penalty: {g.repetition_penalty!r} is not allowed; it must be greater than 0"
        )
    if g.num_return_sequences < 1:
        raise ConfigError(
            f"{prefix}num_return_sequences: {g.num_return_sequences!r} is not allowed; it must be at least 1"
        )
    if g.num_return_sequences > 1 and not g.do_sample:
        raise ConfigError(f"{prefix}num_return_sequences: {g.num_return_sequences} needs do_sample: true")


def looks_local(path: str) -> bool:
    """True when a string names a local path rather than a hub id (`owner/name`)."""
    return (
        path.startswith((".", "/", "~"))
        or path.lower().endswith(LOCAL_SUFFIXES)
        or any(ch in path for ch in "*?[")
        or os.path.exists(path)
        or path.count("/") > 1
    )


def resolve_local_files(paths: str | list[str], key: str) -> list[str] | None:
    """Expand local paths, globs and directories into files; None when `paths` is a hub id.

    Raises a ConfigError naming `key` when a local path matches no file.
    """
    items = [paths] if isinstance(paths, str) else list(paths)
    if items == [SAMPLE_CORPUS]:
        return [sample_corpus_path()]
    if len(items) == 1 and not looks_local(items[0]):
        return None
    files: list[str] = []
    for item in items:
        expanded = os.path.expanduser(item)
        if os.path.isdir(expanded):
            inside = sorted(
                str(p) for p in Path(expanded).rglob("*") if p.is_file() and p.name.lower().endswith(LOCAL_SUFFIXES)
            )
            if not inside:
                raise ConfigError(f"{key}: directory '{item}' holds no .txt, .jsonl, .parquet or .csv file")
            files.extend(inside)
            continue
        matches = sorted(glob.glob(expanded))
        if not matches:
            raise ConfigError(f"{key}: no file matches '{item}'")
        broken = next((m for m in matches if os.path.islink(m) and not os.path.exists(m)), None)
        if broken is not None:
            raise ConfigError(f"{key}: '{broken}' is a symbolic link to '{os.readlink(broken)}', which does not exist")
        if not any(os.path.isfile(m) for m in matches):
            raise ConfigError(f"{key}: '{item}' matches no file")
        files.extend(m for m in matches if os.path.isfile(m))
    return files


def sample_corpus_path() -> str:
    """Path of the sample corpus shipped with the package."""
    return str(Path(__file__).parent / "resources" / "sample_corpus.txt")
