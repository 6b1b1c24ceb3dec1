"""YAML configs -> typed dataclasses, validated at load.

A config has five sections: `model`, `data`, `training`, `generation`, `eval` (plus the optional `peft` and
`card`).
`training` is passed through to `transformers.TrainingArguments`, so any of its fields is valid there.
Every problem is raised as one `ConfigError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import enum
import glob
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from igea.errors import ConfigError, show

SAMPLE_CORPUS = "igea:sample"
"""`data.path` value that names the Italian biomedical sample corpus shipped inside the package."""
GENERAL_TEXT = "igea:general"
"""A corpus value that names the general (not medical) Italian held-out text shipped inside the package: everyday
sentences, to see what continued pretraining on a domain costs the model elsewhere."""
SHIPPED_CORPORA = {SAMPLE_CORPUS: "sample_corpus.txt", GENERAL_TEXT: "general_italian.txt"}

MIX_MODES = {
    "primary": "an epoch is one pass over the first source; the others are drawn by weight and start over when "
               "they run out",
    "all_exhausted": "an epoch ends once every source has been seen whole; the others start over meanwhile",
    "first_exhausted": "an epoch ends when the first source to run out does: no source repeats, the others are "
                       "seen in part",
}
"""`data.mix`: what an epoch of weighted `data.sources` is (`data.token_budget` sizes the mixture instead)."""

ALL_LINEAR = "all-linear"
"""`peft.target_modules` value that puts an adapter on every linear layer but the LM head (peft's shorthand)."""

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".gz", ".zst", ".bz2", ".xz")

# The defaults of the `training:` section: the card's optimizer recipe (Igea-1B: learning rate, Adam betas and
# epsilon, no weight decay, cosine schedule with 2% warmup, one epoch, seed 42), one sequence batch of 8 per
# device without accumulation, and a cadence relative to the run's length (a float below 1 is a fraction of
# the training steps) so that a short run logs too. Evaluating and saving are RELATIVE_CADENCE, kept out of
# this dict so that a config that leaves them out can be told from one that sets them. The card's own layout
# and 5000-step cadence are in configs/igea-*.yaml. Anything else falls back to transformers' TrainingArguments
# defaults.
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "adam_epsilon": 1e-8,
    "weight_decay": 0.0,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.02,
    "num_train_epochs": 1.0,
    "seed": 42,
    "eval_strategy": "steps",
    "logging_steps": 0.02,
    "save_strategy": "steps",
    "save_total_limit": 2,
    "report_to": "none",
}

RELATIVE_CADENCE: dict[str, float] = {"eval_steps": 0.1, "save_steps": 0.1}
"""`training.eval_steps` / `save_steps` when a config leaves them out: every 10% of the run's steps, but never
more often than every CADENCE_FLOOR_STEPS steps (igea.train settles them once the run's length is known)."""
CADENCE_FLOOR_STEPS = 50
"""A short run evaluates and saves at its end rather than at every step (10% of 10 steps is one step)."""

IGEA_TRAINING_KEYS: dict[str, type | tuple[type, ...]] = {
    "warmup_ratio": float,  # transformers 5 folds it into a float `warmup_steps` in [0, 1)
    "total_train_batch_size": int,  # derive gradient accumulation from the world size
    "stop_on_nonfinite_loss": bool,  # stop the run when the training loss is NaN or inf
    "log_throughput": bool,  # add tokens/s (and MFU on a GPU) to every training log (igea.tracking)
}


class Section:
    """A config section validates itself whenever it is built, from YAML or in Python (`DataConfig(...)`,
    `dataclasses.replace`): each value is type-checked (and converted where YAML is loose), then `check`
    judges the values. Errors name the key as a config file would (`data.block_size`)."""

    KEY: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f"{self.KEY}.{f.name}"))
        self.check()

    def check(self) -> None:
        """Range and consistency checks of this section's values."""


@dataclass
class TinyModelConfig(Section):
    """Shape of a tiny Mistral built locally (with a BPE tokenizer trained on the corpus)."""

    KEY: ClassVar[str] = "model.tiny"

    vocab_size: int = 1024
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 192
    max_position_embeddings: int = 1024
    seed: int = 0

    def check(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings"):
            _at_least(self, name, 1)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{self.KEY}: hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}), and that a multiple of num_key_value_heads ({self.num_key_value_heads})"
            )


DEVICE = re.compile(r"cpu|cuda(:\d+)?")
"""Devices a config may name for work igea runs outside training (the vocabulary's fit)."""


@dataclass
class ExtendVocabularyConfig(Section):
    """New tokens for the corpus' frequent words that the base tokenizer splits into pieces (igea.vocab).

    The run builds the extended base model into `<output_dir>/base-model-extended` once, then trains it.
    """

    KEY: ClassVar[str] = "model.extend_vocabulary"

    num_tokens: int  # how many tokens to add (new BPE merges learned on the corpus)
    corpus: str | list[str] | None = None  # files, globs, directories or a hub id; default: the run's training split
    max_documents: int | None = None  # read at most this many documents of the corpus
    fit_documents: int | None = None  # documents the new rows are fitted and distilled on; 0: none; default: sized
    device: str | None = None  # where the fit runs: cpu, cuda, cuda:N; default: cuda when available

    def check(self) -> None:
        _at_least(self, "num_tokens", 1)
        _at_least(self, "max_documents", 1)
        _at_least(self, "fit_documents", 0)
        if self.device is not None and not DEVICE.fullmatch(self.device):
            raise ConfigError(f"{self.KEY}.device: {show(self.device)} is not allowed; choose cpu, cuda or cuda:N")
        if self.corpus is not None:
            resolve_local_files(self.corpus, f"{self.KEY}.corpus")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
"""A model directory with a tokenizer holds at least one of these; a bare checkpoint of a trainer holds none."""


def has_tokenizer_files(directory: str | Path) -> bool:
    """Does a model directory hold a tokenizer (checked before loading, whose own error is cut off)?"""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def no_tokenizer(directory: str) -> str:
    """The words for a directory without tokenizer files."""
    return f"directory '{directory}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)})"


@dataclass
class ModelConfig(Section):
    """The base model: a hub id or a local directory, or a tiny Mistral built on the fly."""

    KEY: ClassVar[str] = "model"

    name_or_path: str | None = None
    tiny: TinyModelConfig | None = None
    extend_vocabulary: ExtendVocabularyConfig | None = None
    tokenizer: str | None = None  # hub id or directory; default: the model's own (as run_clm's --tokenizer_name)
    revision: str | None = None
    dtype: str = "auto"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    def check(self) -> None:
        _choice(self, "dtype", ("auto", "float32", "bfloat16", "float16"))
        if (self.name_or_path is None) == (self.tiny is None):
            raise ConfigError("model: set exactly one of 'model.name_or_path' (hub id or directory) and 'model.tiny'")
        if self.name_or_path is not None and looks_local(self.name_or_path) and not Path(self.name_or_path).is_dir():
            raise ConfigError(f"model.name_or_path: directory '{self.name_or_path}' does not exist")
        if self.tokenizer is None:
            if self.name_or_path is not None and Path(self.name_or_path).is_dir() and \
                    not has_tokenizer_files(self.name_or_path):
                raise ConfigError(f"model.name_or_path: {no_tokenizer(self.name_or_path)}; set model.tokenizer to "
                                  "the hub id or directory of its tokenizer")
        elif self.tiny is not None:
            raise ConfigError("model.tokenizer: not with model.tiny, which trains its own tokenizer on the corpus")
        elif looks_local(self.tokenizer) and not Path(self.tokenizer).is_dir():
            raise ConfigError(f"model.tokenizer: directory '{self.tokenizer}' does not exist")
        elif Path(self.tokenizer).is_dir() and not has_tokenizer_files(self.tokenizer):
            raise ConfigError(f"model.tokenizer: {no_tokenizer(self.tokenizer)}")


@dataclass
class SourceConfig(Section):
    """One corpus in a weighted mixture (`data.sources`)."""

    KEY: ClassVar[str] = "data.sources[]"

    path: str | list[str]
    weight: float = 1.0
    text_column: str | None = None
    name: str | None = None  # a hub dataset's configuration (as `load_dataset(path, name)`)
    split: str = "train"
    label: str | None = None  # the source's name in metrics, logs and the card (default: its name or file)


@dataclass
class DataConfig(Section):
    """Where the corpus comes from and how it becomes fixed-length blocks of token ids."""

    KEY: ClassVar[str] = "data"

    path: str | list[str] | None = None
    sources: list[SourceConfig] = field(default_factory=list)
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    text_column: str = "text"
    label: str | None = None  # the corpus' name in metrics, logs and the card (default: its file or dataset name)
    validation_path: str | list[str] | dict[str, str | list[str]] | None = None
    validation_split: float | int = 0.05
    max_documents: int | None = None
    min_chars: int = 1
    encoding_errors: str = "strict"
    block_size: int = 2048
    document_boundary: str = "eos"
    packing: str = "blocks"
    mix: str = "primary"  # with several sources: what an epoch of the mixture is (see MIX_MODES)
    streaming: bool = False
    token_budget: int | None = None
    shuffle_buffer: int = 10000
    num_proc: int | None = None
    cache_dir: str | None = None
    seed: int | None = None

    def check(self) -> None:
        _choice(self, "encoding_errors", ("strict", "replace", "ignore"))
        _choice(self, "document_boundary", ("eos", "special_tokens"))
        _choice(self, "packing", ("blocks", "documents"))
        _choice(self, "mix", tuple(MIX_MODES))
        if self.path is not None and self.sources:
            raise ConfigError("data: set either 'data.path' or 'data.sources', not both")
        for key, paths in [("data.path", self.path), *validation_paths(self).items()] + [
            (f"data.sources[{i}].path", s.path) for i, s in enumerate(self.sources)
        ]:
            if paths is not None:
                check_corpus_files(paths, key)
        source_names(self)  # each a distinct identifier
        held_out_set_names(self)
        for i, source in enumerate(self.sources):
            if source.weight <= 0:
                raise ConfigError(f"data.sources[{i}].weight: {show(source.weight)} is not allowed; it must be "
                                  "greater than 0")
        _at_least(self, "block_size", 2)
        _at_least(self, "shuffle_buffer", 1)
        vs = self.validation_split
        if isinstance(vs, float) and not 0 <= vs < 1 or isinstance(vs, int) and vs < 0:
            raise ConfigError(
                f"data.validation_split: {show(vs)} is not allowed; use a fraction in [0, 1) or a count >= 0"
            )
        for name in ("min_chars", "max_documents", "token_budget", "num_proc"):
            _at_least(self, name, 0)


@dataclass
class GenerationConfig(Section):
    """Sampling parameters for `igea.generate` and the samples printed at the end of a run."""

    KEY: ClassVar[str] = "generation"

    prompts: list[str] = field(default_factory=lambda: ["Il fegato è "])
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    seed: int | None = 42

    def check(self) -> None:
        check_generation_values(self, "generation.")
        for i, prompt in enumerate(self.prompts):
            if not prompt.strip():
                raise ConfigError(f"generation.prompts[{i}]: an empty prompt is not allowed; give the text to continue")


@dataclass
class EvalConfig(Section):
    """Evaluation: held-out metrics before, during and after training, and multiple-choice benchmarks after it
    (or at every evaluation, with `during_training`)."""

    KEY: ClassVar[str] = "eval"

    before_training: bool = True  # also evaluate the base model, before the first step
    tasks: list[str] = field(default_factory=list)  # benchmarks: built-in names or task/question files
    num_fewshot: int | None = None  # examples before each question (None: each task's own count)
    limit: int | None = None  # score only the first N questions of each task
    batch_size: int = 8  # questions scored together
    during_training: bool = False  # also score `tasks` at every evaluation (eval_<task>_acc, eval_<task>_acc_norm)

    def check(self) -> None:
        _at_least(self, "limit", 0)
        _at_least(self, "num_fewshot", 0)
        _at_least(self, "batch_size", 1)
        check_task_names(self.tasks)
        if self.during_training and not self.tasks:
            raise ConfigError("eval.during_training: true needs benchmarks to score; name them in eval.tasks")


@dataclass
class AdapterConfig(Section):
    """The `peft:` section: train LoRA (or DoRA) adapters with peft instead of every weight of the base model.

    Present (even empty, `peft: {}`) means on. For a new language, also train the embeddings and the LM head
    in full: `modules_to_save: [embed_tokens, lm_head]`.
    """

    r: int = 16
    """Rank of each adapter's update matrices (its size grows linearly with it)."""
    alpha: float | None = None
    """The update is scaled by alpha / r; by default alpha = 2 r (a scale of 2, whatever the rank)."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    """Names of the modules that get an adapter, e.g. [q_proj, v_proj] (the last part of a module's name);
    `all-linear` (the default): every linear layer of the decoder, the LM head excepted."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters, e.g. [embed_tokens, lm_head] for a new language."""
    use_dora: bool = False
    """DoRA: weight-decomposed adapters (a magnitude vector per layer), closer to full training, slower."""
    merge: bool = True
    """Also save the base weights with the adapters merged in, so the run directory loads as a plain model;
    the adapter alone goes to `adapter/`. With false, the run directory holds the adapter only (it loads on
    top of the base model, which must stay reachable)."""

    KEY: ClassVar[str] = "peft"

    def check(self) -> None:
        check_adapter_values(self)


HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
"""A Hugging Face hub repo id: `owner/name` (or a bare `name` for models without an owner, such as gpt2)."""
HUB_LICENSE = re.compile(r"[a-z0-9][a-z0-9.-]*")
"""A hub license identifier: apache-2.0, mit, cc-by-4.0, llama3.1, other, ..."""


@dataclass
class CardConfig(Section):
    """The model card (`README.md`) written at the end of a run: its text, and the hub metadata of its front
    matter. Nothing the user did not ask for is claimed: no license or tags unless given here."""

    KEY: ClassVar[str] = "card"

    title: str | None = None
    description: str | None = None
    repo_id: str | None = None
    """Where the model will be published (owner/name): the card's usage snippet loads it from there."""
    base_model: str | None = None
    """The base model's hub id, for the `base_model` metadata: needed when model.name_or_path is a local
    directory (by default the hub id of model.name_or_path)."""
    language: list[str] = field(default_factory=lambda: ["it"])
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    risks: str | None = None

    def check(self) -> None:
        for name in ("repo_id", "base_model"):
            value = getattr(self, name)
            owner = name != "repo_id" or value is None or "/" in value
            if value is not None and (not HUB_ID.fullmatch(value) or ".." in value or not owner):
                raise ConfigError(f"card.{name}: {show(value)} is not a hub repo id; give owner/name as on "
                                  "huggingface.co, e.g. sapienzanlp/Minerva-1B-base-v1.0")
        if self.license is not None and not HUB_LICENSE.fullmatch(self.license):
            raise ConfigError(f"card.license: {show(self.license)} is not a hub license identifier; use one such as "
                              "apache-2.0, mit, cc-by-4.0 or other (huggingface.co/docs/hub/repositories-licenses)")


@dataclass
class IgeaConfig:
    """A whole run: what the YAML file says, typed and validated."""

    model: ModelConfig = field(default_factory=dict)  # a mapping is built into its section (which checks it)
    data: DataConfig = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    peft: AdapterConfig | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    card: CardConfig = field(default_factory=CardConfig)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(IgeaConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f.name))
        self.training = _validate_training(self.training)
        _check_across_sections(self)

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that `config_from_dict` turns back into the same config (saved with each run)."""
        return dataclasses.asdict(self)


RESUME_SAFE_KEYS = frozenset({
    "data.num_proc", "data.cache_dir",
    *(f"training.{key}" for key in (
        "output_dir", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step",
        "logging_nan_inf_filter", "eval_steps", "eval_strategy", "eval_delay", "eval_accumulation_steps",
        "per_device_eval_batch_size", "batch_eval_metrics", "save_steps", "save_strategy", "save_total_limit",
        "save_only_model", "report_to", "run_name", "project", "disable_tqdm",
        "log_level", "log_level_replica", "dataloader_num_workers", "dataloader_pin_memory",
        "dataloader_persistent_workers", "dataloader_prefetch_factor", "push_to_hub", "hub_model_id",
        "hub_strategy", "hub_token", "hub_private_repo", "stop_on_nonfinite_loss", "include_num_input_tokens_seen",
    )),
})
"""Settings a resumed run may change without changing what is trained: logging, evaluation and saving cadence,
reporting, data loading workers. Any other change of `model`, `data` or `training` needs an explicit yes."""

TRAINED_SECTIONS = ("model", "data", "training")


def changed_settings(started: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The dotted keys of the trained sections whose value differs between two configs (as `to_dict` gives
    them), with (started, now) values; settings in RESUME_SAFE_KEYS are not counted."""
    before, after = _flatten(started, TRAINED_SECTIONS), _flatten(now, TRAINED_SECTIONS)
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if key not in RESUME_SAFE_KEYS and _plain(before.get(key)) != _plain(after.get(key))
    }


def _flatten(config: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}")
        else:
            flat[prefix] = node

    for section in sections:
        walk(config.get(section), section)
    return flat


def _plain(value: Any) -> Any:
    """A value as JSON would give it back (tuples become lists), so a saved config compares equal to a new one."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


BUILTIN_TASK_NAMES = ("arc_it", "hellaswag_it", "medmcqa_ita", "mmlu_it")
"""The built-in multiple-choice tasks (defined in igea.tasks); any other `eval.tasks` entry is a file."""
TASK_FILE_SUFFIXES = (".yaml", ".yml")
"""An igea task file or an lm-eval task file."""
QUESTION_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
"""A local question file (columns question, choices, answer)."""



def load_config(source: str | os.PathLike | dict[str, Any], overrides: list[str] | str | None = None) -> IgeaConfig:
    """A validated config from a YAML file or a dict (the same sections), with dotted `key=value` overrides.

    >>> cfg = load_config("configs/demo.yaml", ["training.learning_rate=1e-4"])
    >>> cfg = load_config({"model": {"tiny": {}}, "data": {"path": "igea:sample"}}, "training.max_steps=5")

    `training.output_dir` defaults to `runs/<file name>` (`runs/igea` for a dict). Relative paths in a config
    are relative to the current directory, as on the command line.
    """
    if isinstance(source, dict):
        raw, name = copy.deepcopy(source), "igea"
    else:
        raw, name = read_yaml(Path(source)), Path(source).stem
    for item in [overrides] if isinstance(overrides, str) else overrides or []:
        apply_override(raw, item)
    raw.setdefault("training", {})
    if isinstance(raw["training"], dict):
        raw["training"].setdefault("output_dir", str(Path("runs") / name))
    return config_from_dict(raw)


class ConfigLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, except that a key written twice in one mapping is an error: PyYAML would keep
    the last one silently (two held-out sets with one name, a setting given twice). Keys that `<<:` merges in may
    be overridden as usual."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} appears twice in one mapping (lines {seen[key]} and "
                            f"{key_node.start_mark.line + 1})", problem_mark=key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML text as Python values, by `ConfigLoader` (safe, no key twice)."""
    return yaml.load(text, Loader=ConfigLoader)


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping of sections (`yaml.safe_load`), every problem one ConfigError."""
    if path.is_dir():
        raise ConfigError(f"config: '{path}' is a directory; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"config: file '{path}' does not exist")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
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
    if expanded_size(raw) > MAX_CONFIG_VALUES:
        raise ConfigError(f"config: '{path}' expands to more than {MAX_CONFIG_VALUES:,} values (nested YAML aliases)")
    return raw


MAX_CONFIG_VALUES = 100_000
"""More values than any real config has; a few lines of nested YAML aliases can expand to billions."""


def expanded_size(node: Any, memo: dict[int, int] | None = None) -> int:
    """How many values `node` holds once YAML aliases are expanded (shared sub-trees counted once each use)."""
    memo = {} if memo is None else memo
    if not isinstance(node, (dict, list)):
        return 1
    if id(node) not in memo:
        memo[id(node)] = 0  # a self-referencing alias counts as one value
        children = node.values() if isinstance(node, dict) else node
        memo[id(node)] = 1 + sum(expanded_size(child, memo) for child in children)
    return memo[id(node)]


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
    try:
        node[parts[-1]] = parse_yaml(value) if value.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        hint = "" if isinstance(err, yaml.constructor.ConstructorError) else "; quote text"
        raise ConfigError(f"override '{item}': the value is not valid YAML ({problem}){hint}") from None


def config_from_dict(raw: dict[str, Any]) -> IgeaConfig:
    """Build and validate an `IgeaConfig` from a plain dict (a parsed YAML file)."""
    return build_section(IgeaConfig, raw, "")


# ----------------------------------------------------------------------------------------------------------
# Generic dataclass builder with type checks


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """The dataclass `cls` from a mapping, every value type-checked; errors name `prefix` + the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {show(raw)}")
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


def _unknown_key(full_key: str, key: str, allowed: list[str], described: str | None = None) -> str:
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {', '.join(repr(c) for c in close)}?"
    else:
        hint = f"allowed: {described or ', '.join(allowed)}"
    return f"unknown key '{show(full_key)[1:-1]}'; {hint}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint, converting where YAML is loose (`5e-5` is a string in YAML 1.1)."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if sections and isinstance(value, sections[0]):
            return value
        if sections and isinstance(value, dict):  # `TinyModelConfig | None`: the section's own errors name the key
            return build_section(sections[0], value, f"{key}.")
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
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {show(value)}")
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(hint)}, got {show(value)}")
        if len(args) != 2 or args[1] is Any:
            return dict(value)
        for name in value:
            if not isinstance(name, str):
                raise ConfigError(f"{key}: {show(name)} is not allowed as a key; keys are names (text)")
        return {name: _coerce(v, args[1], f"{key}.{name}") for name, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build_section(hint, value, f"{key}.")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if isinstance(value, hint):
            return value.value
        if value is False and "no" in allowed:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if value not in allowed:
            raise ConfigError(f"{key}: {show(value)} is not allowed; choose one of {', '.join(map(str, allowed))}")
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {value} is not allowed; it must be a finite number")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {show(value)}")


def _type_name(hint: Any, plural: bool = False) -> str:
    """How an error names a type hint: `a string or a list of strings or null`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list or hint is list:
        return ("lists" if plural else "a list") + (f" of {_type_name(args[0], plural=True)}" if args else "")
    if origin is dict or hint is dict:
        values = f" (name: {_type_name(args[1])})" if len(args) == 2 and args[1] is not Any else ""
        return ("mappings" if plural else "a mapping") + values
    if args:
        return " or ".join(_type_name(a, plural) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    names = {bool: ("true/false", "true/false values"), int: ("an integer", "integers"),
             float: ("a number", "numbers"), str: ("a string", "strings")}
    if hint in names:
        return names[hint][plural]
    return getattr(hint, "__name__", str(hint))


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
            raise ConfigError(_unknown_key(full, key, allowed, "the fields of transformers.TrainingArguments and "
                                           f"igea's {', '.join(IGEA_TRAINING_KEYS)}"))
    if checked.get("enable_jit_checkpoint"):
        raise ConfigError(
            "training.enable_jit_checkpoint: true is not allowed; igea itself saves a checkpoint when it receives "
            "SIGTERM or SIGUSR1 and leaves the run unfinished, ready for --resume"
        )
    if "warmup_steps" in section and "warmup_ratio" not in section:
        checked.pop("warmup_ratio")
    _check_training_ranges(checked)
    return checked


def _check_training_ranges(t: dict[str, Any]) -> None:
    positive = ["learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "num_train_epochs", "adam_epsilon"]
    for key in positive:
        if key in t and t[key] is not None and t[key] <= 0:
            raise ConfigError(f"training.{key}: {show(t[key])} is not allowed; it must be greater than 0")
    for key in ("adam_beta1", "adam_beta2"):
        if key in t and not 0 <= t[key] < 1:
            raise ConfigError(f"training.{key}: {show(t[key])} is not allowed; it must be in [0, 1)")
    if t.get("weight_decay", 0) < 0:
        raise ConfigError(f"training.weight_decay: {show(t['weight_decay'])} is not allowed; it must be >= 0")
    ratio = t.get("warmup_ratio")
    if ratio is not None and not 0 <= ratio < 1:
        raise ConfigError(f"training.warmup_ratio: {show(ratio)} is not allowed; it must be in [0, 1)")
    if t.get("max_steps", -1) == 0 or t.get("max_steps", -1) < -1:
        raise ConfigError(
            f"training.max_steps: {show(t['max_steps'])} is not allowed; use -1 (epochs) or a positive count"
        )
    schedule = getattr(t.get("lr_scheduler_type"), "value", t.get("lr_scheduler_type"))
    if schedule == "warmup_stable_decay":
        kwargs = t.get("lr_scheduler_kwargs") or {}
        decay = kwargs.get("num_decay_steps") if isinstance(kwargs, dict) else None
        if not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and decay >= 0):
            raise ConfigError("training.lr_scheduler_kwargs: warmup_stable_decay needs num_decay_steps, a number of "
                              "steps or a share of the run below 1 (e.g. {num_decay_steps: 0.2}: the last 20%)")
    total = t.get("total_train_batch_size")
    if total is not None and total <= 0:
        raise ConfigError(f"training.total_train_batch_size: {show(total)} is not allowed; it must be greater than 0")
    if not t.get("output_dir"):
        raise ConfigError("training.output_dir: must be set to the directory of the run")


# ----------------------------------------------------------------------------------------------------------
# Cross-field checks


def _check_across_sections(cfg: IgeaConfig) -> None:
    """Checks that need two sections at once, or a whole run (each section checked its own values when it was
    built)."""
    if cfg.data.path is None and not cfg.data.sources:
        raise ConfigError("data: set 'data.path' (hub id, file, glob or directory) or 'data.sources'")
    if cfg.data.streaming:
        _check_streaming(cfg.data, cfg.training)
    _check_best_metric(cfg)
    ext = cfg.model.extend_vocabulary
    if ext is not None and ext.corpus is None:  # it learns on the run's own training split
        key = "model.extend_vocabulary"
        if cfg.data.sources:
            raise ConfigError(f"{key}.corpus: must be set when the corpus is a mixture (data.sources)")
        if cfg.data.streaming and ext.max_documents is None:
            raise ConfigError(f"{key}.max_documents: must be set with data.streaming (a stream is read only in part)")


HELD_OUT_METRICS = ("loss", "accuracy", "perplexity")
"""What each evaluation reports per held-out set (`eval_<set>_loss`, ...) and over all of them (`eval_loss`, ...)."""
TASK_METRICS = ("acc", "acc_norm")
"""What a benchmark scored during training reports (`eval_<task>_acc`, `eval_<task>_acc_norm`)."""


def held_out_metric_names(d: DataConfig) -> list[str]:
    """The held-out metrics an evaluation logs: the totals (`eval_loss`, ...) and, with two or more held-out
    sets, each set's (`eval_general_loss`, ...)."""
    sets = held_out_set_names(d)
    names = [f"eval_{m}" for m in HELD_OUT_METRICS] if sets else []
    if len(sets) > 1:
        names += [f"eval_{s}_{m}" for s in sets for m in HELD_OUT_METRICS]
    return names


def task_metric_key(task: str, metric: str) -> str:
    """The metric name of a benchmark scored during training: `eval_<task>_<metric>` (task made an identifier)."""
    name = re.sub(r"\W+", "_", task, flags=re.ASCII).strip("_")
    return f"eval_{name}_{metric}"


def _check_best_metric(cfg: IgeaConfig) -> None:
    """`training.metric_for_best_model` names a metric the run's evaluations will log (a benchmark's is checked
    once the tasks are loaded, before training)."""
    metric = cfg.training.get("metric_for_best_model")
    if metric is None:
        return
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    allowed = held_out_metric_names(cfg.data)
    if not allowed:
        raise ConfigError(f"training.metric_for_best_model: {show(metric)} needs a held-out set to evaluate; set "
                          "data.validation_split or data.validation_path")
    is_task_metric = cfg.eval.during_training and re.fullmatch(r"eval_\w+_(acc|acc_norm)", key)
    if key not in allowed and not is_task_metric:
        close = difflib.get_close_matches(key, allowed, n=2, cutoff=0.7)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        tasks = "; a benchmark's eval_<task>_acc or _acc_norm with eval.during_training" if cfg.eval.tasks else ""
        raise ConfigError(f"training.metric_for_best_model: {show(metric)} names no held-out set or metric the run "
                          f"logs; {hint}choose one of {', '.join(allowed)}{tasks}")


def _choice(section: Section, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(section, name)
    if value not in allowed:
        raise ConfigError(f"{section.KEY}.{name}: {show(value)} is not allowed; choose one of {', '.join(allowed)}")


def _at_least(section: Section, name: str, low: int) -> None:
    value = getattr(section, name)
    if value is not None and value < low:
        relation = f"at least {low}" if low else ">= 0"
        raise ConfigError(f"{section.KEY}.{name}: {show(value)} is not allowed; it must be {relation}")


def check_task_names(names: list[str], key: str = "eval.tasks") -> None:
    """Each name is a built-in task or an existing task or question file (igea.tasks.load_tasks reads them)."""
    for name in names:
        if name in BUILTIN_TASK_NAMES:
            continue
        if name.lower().endswith(TASK_FILE_SUFFIXES + QUESTION_FILE_SUFFIXES):
            if not Path(name).expanduser().is_file():
                raise ConfigError(f"{key}: task file '{name}' does not exist")
            continue
        raise ConfigError(
            f"{key}: unknown task '{name}'; known tasks: {', '.join(BUILTIN_TASK_NAMES)} "
            "(or a .yaml task file: igea's or lm-eval's, or a .jsonl/.csv/.parquet file with question, choices "
            "and answer columns)"
        )


def _check_streaming(d: DataConfig, training: dict[str, Any]) -> None:
    """A streamed corpus has no length: the run is sized by steps or tokens, the validation set by a count."""
    if isinstance(d.validation_split, float) and d.validation_split > 0 and split_sources(d):
        raise ConfigError(
            f"data.validation_split: {show(d.validation_split)} is a fraction, which a streamed corpus cannot take; "
            "give a count of documents (e.g. 500), 0, or data.validation_path"
        )
    has_steps = training.get("max_steps", -1) > 0
    if has_steps == (d.token_budget is not None):
        raise ConfigError(
            "data.streaming: size the run with exactly one of training.max_steps and data.token_budget "
            "(a streamed corpus has no length)"
        )
    workers = training.get("dataloader_num_workers", 0)
    if isinstance(workers, int) and workers > 0:
        raise ConfigError(
            f"training.dataloader_num_workers: {workers!r} is not allowed with "
            "data.streaming (the stream is read in the main process, which saves its position); use 0"
        )


def check_adapter_values(p: AdapterConfig) -> None:
    """Range checks of the `peft:` section (module names are checked against the model when it is known)."""
    if p.r < 1:
        raise ConfigError(f"peft.r: {show(p.r)} is not allowed; it must be at least 1")
    if p.alpha is not None and p.alpha <= 0:
        raise ConfigError(f"peft.alpha: {show(p.alpha)} is not allowed; it must be greater than 0")
    if not 0 <= p.dropout < 1:
        raise ConfigError(f"peft.dropout: {show(p.dropout)} is not allowed; it must be in [0, 1)")
    if not p.target_modules:
        raise ConfigError(f"peft.target_modules: [] is not allowed; name at least one module, or {ALL_LINEAR}")
    if ALL_LINEAR in p.target_modules and len(p.target_modules) > 1:
        raise ConfigError(f"peft.target_modules: {show(p.target_modules)} is not allowed; {ALL_LINEAR} stands alone")
    for key, names in (("peft.target_modules", p.target_modules), ("peft.modules_to_save", p.modules_to_save)):
        for name in names:
            if not name.strip():
                raise ConfigError(f"{key}: {show(name)} is not allowed; give module names such as q_proj")


def check_generation_values(g: GenerationConfig, prefix: str = "") -> None:
    """Range checks shared by the config loader and per-call overrides of `Generator.generate`."""
    if g.max_new_tokens < 1:
        raise ConfigError(f"{prefix}max_new_tokens: {show(g.max_new_tokens)} is not allowed; it must be at least 1")
    if g.temperature <= 0:
        raise ConfigError(f"{prefix}temperature: {show(g.temperature)} is not allowed; it must be greater than 0")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"{prefix}top_p: {show(g.top_p)} is not allowed; it must be in (0, 1]")
    if g.top_k < 0:
        raise ConfigError(f"{prefix}top_k: {show(g.top_k)} is not allowed; it must be >= 0")
    if g.repetition_penalty <= 0:
        raise ConfigError(
            f"{prefix}repetition_penalty: {show(g.repetition_penalty)} is not allowed; it must be greater than 0"
        )
    if g.num_return_sequences < 1:
        raise ConfigError(
            f"{prefix}num_return_sequences: {show(g.num_return_sequences)} is not allowed; it must be at least 1"
        )
    if g.num_return_sequences > 1 and not g.do_sample:
        raise ConfigError(f"{prefix}num_return_sequences: {g.num_return_sequences} needs do_sample: true")


def looks_local(path: str) -> bool:
    """True when a string names a local path rather than a hub id (`owner/name`, or a bare `name`).

    A bare name with a file suffix (`corpus.tx`, a typo of `corpus.txt`) is a local file that does not exist,
    not a hub id: hub ids without an owner name canonical datasets, which have no suffix.
    """
    return (
        path.startswith((".", "/", "~"))
        or path.lower().endswith(LOCAL_SUFFIXES)
        or any(ch in path for ch in "*?[")
        or os.path.exists(path)
        or path.count("/") > 1
        or ("/" not in path and re.search(r"\.[A-Za-z0-9]{1,5}$", path) is not None)
    )


def resolve_local_files(paths: str | list[str], key: str) -> list[str] | None:
    """Expand local paths, globs and directories into files; None when `paths` is a hub id.

    Raises a ConfigError naming `key` when a local path matches no file.
    """
    items = [paths] if isinstance(paths, str) else list(paths)
    if not items:
        raise ConfigError(f"{key}: [] names no file; give a file, a list of files, a glob or a directory")
    if len(items) == 1 and items[0] in SHIPPED_CORPORA:
        return [shipped_corpus_path(items[0])]
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
            where = "" if os.path.isabs(expanded) else f" (relative to the current directory, {os.getcwd()})"
            raise ConfigError(f"{key}: no file matches '{item}'{where}")
        broken = next((m for m in matches if os.path.islink(m) and not os.path.exists(m)), None)
        if broken is not None:
            raise ConfigError(f"{key}: '{broken}' is a symbolic link to '{os.readlink(broken)}', which does not exist")
        if not any(os.path.isfile(m) for m in matches):
            raise ConfigError(f"{key}: '{item}' matches no file")
        files.extend(m for m in matches if os.path.isfile(m))
    return files


PRESETS_DIR = Path(__file__).parent / "configs"
"""The configs shipped with igea (the repository's `configs/` links here)."""


def preset(name: str) -> Path:
    """The path of a config shipped with igea: `demo`, `igea-350m`, `igea-1b` or `igea-3b`.

    >>> cfg = load_config(preset("demo"), "training.max_steps=20")
    """
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"preset: {show(name)} is not a config shipped with igea; choose one of {names}")
    return path


def sample_corpus_path() -> str:
    """Path of the sample corpus shipped with the package."""
    return shipped_corpus_path(SAMPLE_CORPUS)


def shipped_corpus_path(name: str) -> str:
    """Path of a text shipped with the package: `igea:sample` or `igea:general`."""
    return str(Path(__file__).parent / "resources" / SHIPPED_CORPORA[name])


def check_corpus_files(paths: str | list[str], key: str) -> None:
    """A corpus setting names files that exist and are not all empty (a hub id is checked when it is loaded)."""
    files = resolve_local_files(paths, key)
    if files and all(os.path.getsize(f) == 0 for f in files):
        where = f"'{files[0]}' is empty" if len(files) == 1 else f"all {len(files)} files are empty"
        raise ConfigError(f"{key}: {where}; a corpus needs text")


# ----------------------------------------------------------------------------------------------------------
# Sources and held-out sets, and their names


def data_sources(d: DataConfig) -> list[SourceConfig]:
    """The corpora to read: `data.sources`, or the single `data.path` as one source of weight 1."""
    if d.sources:
        return [dataclasses.replace(s, text_column=s.text_column or d.text_column) for s in d.sources]
    return [SourceConfig(path=d.path, weight=1.0, text_column=d.text_column, name=d.name, split=d.split,
                         label=d.label)]


def source_name(source: SourceConfig) -> str:
    """A source's name in metrics, logs and the card: its `label`, else its `name`, else its file's or dataset's
    name made an identifier (`abstracts.txt` -> `abstracts`, `IVN-RIN/BioBERT_Italian` -> `BioBERT_Italian`)."""
    if source.label is not None:
        return source.label
    path = source.path if isinstance(source.path, str) else source.path[0]
    if source.name is not None:
        stem = source.name
    elif path in SHIPPED_CORPORA:
        stem = path.split(":", 1)[1]
    else:
        parts = [p for p in re.split(r"[/\\]", path) if p and not any(ch in p for ch in "*?[")]
        stem = parts[-1] if parts else "corpus"
        if looks_local(path) and "." in stem:
            stem = stem.split(".", 1)[0] or stem
    name = re.sub(r"\W+", "_", stem, flags=re.ASCII).strip("_") or "corpus"
    return f"set_{name}" if name[0].isdigit() else name


def source_names(d: DataConfig) -> list[str]:
    """Each source's name (see `source_name`), in order: distinct identifiers, else one ConfigError."""
    where: dict[str, str] = {}
    for i, source in enumerate(data_sources(d) if d.path is not None or d.sources else []):
        key = (f"data.sources[{i}]" if d.sources else "data") + ".label"
        _add_name(where, source_name(source), key, "source")
    return list(where)


def validation_paths(d: DataConfig) -> dict[str, str | list[str]]:
    """`data.validation_path` by config key: one entry, or one per named held-out set."""
    if isinstance(d.validation_path, dict):
        return {f"data.validation_path.{name}": paths for name, paths in d.validation_path.items()}
    return {} if d.validation_path is None else {"data.validation_path": d.validation_path}


def split_sources(d: DataConfig) -> list[SourceConfig]:
    """The sources whose held-out documents (`data.validation_split`) are a held-out set: every source, unless
    the split is 0 or a plain `data.validation_path` replaces it (a mapping of named sets adds to it)."""
    if not d.validation_split or isinstance(d.validation_path, (str, list)) or (d.path is None and not d.sources):
        return []
    return data_sources(d)


def held_out_set_names(d: DataConfig) -> list[str]:
    """The names of the held-out sets, in order: each source's split, then each named `data.validation_path`.

    Each is an identifier (it becomes part of metric names: `eval_<name>_loss`) and no two are alike.
    """
    where: dict[str, str] = {}
    sources = split_sources(d)
    for i, source in enumerate(sources):
        key = (f"data.sources[{i}]" if d.sources else "data") + ".label"
        _add_name(where, source_name(source), key, "held-out set")
    if isinstance(d.validation_path, dict):
        if not d.validation_path:
            raise ConfigError("data.validation_path: {} names no held-out set; map names to files, "
                              "e.g. {general: general.txt}")
        for name in d.validation_path:
            _add_name(where, name, f"data.validation_path.{name}", "held-out set")
    elif d.validation_path is not None:
        where["validation"] = "data.validation_path"
    return list(where)


def _add_name(where: dict[str, str], name: str, key: str, what: str) -> None:
    """Record `name` (from config `key`) in `where`, refusing one that is no identifier or is already taken."""
    if not (isinstance(name, str) and name.isidentifier() and name.isascii()):
        raise ConfigError(f"{key}: {show(name)} is not allowed as the name of a {what}; use letters, digits and _ "
                          "(not first a digit), e.g. general or biomed_it")
    if name in where:
        raise ConfigError(f"{key}: two {what}s are named {name!r} ({where[name]} and {key}); give each a "
                          "distinct name (data.label, data.sources[].label)")
    where[name] = key
