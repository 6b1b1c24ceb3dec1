"""The whole config, `IgeaConfig`: its sections put together, the `training:` section passed through to
`transformers.TrainingArguments` (igea's defaults and keys, range checks), the checks that need more than one
section (metric_for_best_model, streaming, the extended vocabulary's corpus), and which settings a resumed run
may change.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igea.config.coerce import _coerce, _coerce_scalar, _unknown_key
from igea.config.schema import AdapterConfig, CardConfig, EvalConfig, GenerationConfig, ModelConfig
from igea.config.sources import DataConfig, held_out_set_names, split_sources
from igea.errors import ConfigError, show

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
    "log_throughput": bool,  # tokens/s (MFU, peak memory on a GPU) in every training log; default true
}


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
