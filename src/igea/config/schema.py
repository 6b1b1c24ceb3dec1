"""The sections of a config as dataclasses, each with its own checks: `model` (with `model.tiny` and
`model.extend_vocabulary`), `generation`, `eval`, `peft` and `card`; the `data` section is in
`igea.config.sources`.

`Section` is their base: a section validates itself whenever it is built, from YAML or in Python.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from igea.config.coerce import _coerce
from igea.config.files import has_tokenizer_files, looks_local, no_tokenizer, resolve_local_files
from igea.errors import ConfigError, show

ALL_LINEAR = "all-linear"
"""`peft.target_modules` value that puts an adapter on every linear layer but the LM head (peft's shorthand)."""

BUILTIN_TASK_NAMES = ("arc_it", "hellaswag_it", "medmcqa_ita", "mmlu_it")
"""The built-in multiple-choice tasks (defined in igea.tasks); any other `eval.tasks` entry is a file."""
TASK_FILE_SUFFIXES = (".yaml", ".yml")
"""An igea task file or an lm-eval task file."""
QUESTION_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
"""A local question file (columns question, choices, answer)."""


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


def _choice(section: Section, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(section, name)
    if value not in allowed:
        raise ConfigError(f"{section.KEY}.{name}: {show(value)} is not allowed; choose one of {', '.join(allowed)}")


def _at_least(section: Section, name: str, low: int) -> None:
    value = getattr(section, name)
    if value is not None and value < low:
        relation = f"at least {low}" if low else ">= 0"
        raise ConfigError(f"{section.KEY}.{name}: {show(value)} is not allowed; it must be {relation}")


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
        for value in self.datasets:
            if not HUB_ID.fullmatch(value) or ".." in value:
                raise ConfigError(f"card.datasets: {show(value)} is not a hub dataset id; the card's front matter "
                                  "lists datasets on huggingface.co (owner/name); local and shipped corpora are named "
                                  "in the card's text")
        if self.license is not None and not HUB_LICENSE.fullmatch(self.license):
            raise ConfigError(f"card.license: {show(self.license)} is not a hub license identifier; use one such as "
                              "apache-2.0, mit, cc-by-4.0 or other (huggingface.co/docs/hub/repositories-licenses)")


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
