"""Checks run before training starts, for settings that the config loader alone cannot judge: they need the
model's context, its tokenizer or the benchmark files. A run never trains for hours and then fails on them.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from igea.config import TASK_METRICS, IgeaConfig, held_out_metric_names, task_metric_key
from igea.errors import ConfigError
from igea.modeling import configured_model_path, model_context_length
from igea.tasks import MultipleChoiceTask, load_tasks


def check_before_training(cfg: IgeaConfig, tokenizer: PreTrainedTokenizerBase) -> list[MultipleChoiceTask]:
    """Block size and generation lengths against the model's context; every `eval.tasks` entry readable, and a
    benchmark named by `training.metric_for_best_model` scored during training. Returns the loaded benchmarks."""
    context = check_block_size(cfg)
    check_generation_fits(cfg, tokenizer, context)
    tasks = load_tasks(cfg.eval.tasks, cfg.eval)  # built-in ones are downloaded now, or fail at once when offline
    check_best_metric_task(cfg, tasks)
    return tasks


def check_best_metric_task(cfg: IgeaConfig, tasks: list[MultipleChoiceTask]) -> None:
    """A `metric_for_best_model` that is no held-out metric (the config checked those) is a benchmark's."""
    metric = cfg.training.get("metric_for_best_model")
    if metric is None or not cfg.eval.during_training:
        return
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    if key in held_out_metric_names(cfg.data):
        return
    allowed = [task_metric_key(task.name, m) for task in tasks for m in TASK_METRICS]
    if key not in allowed:
        raise ConfigError(f"training.metric_for_best_model: {metric!r} names no held-out set or benchmark; the "
                          f"benchmarks scored during training give {', '.join(allowed)}")


def check_block_size(cfg: IgeaConfig) -> int | None:
    """Refuse blocks longer than the positions the model was built for; return the model's context."""
    context = model_context_length(configured_model_path(cfg), cfg.model)
    if context is not None and cfg.data.block_size > context:
        raise ConfigError(
            f"data.block_size: {cfg.data.block_size} is longer than the model's context ({context} positions)"
        )
    return context


def check_generation_fits(cfg: IgeaConfig, tokenizer: PreTrainedTokenizerBase, context: int | None) -> None:
    """Each end-of-run prompt plus `generation.max_new_tokens` must fit in the model's context."""
    g = cfg.generation
    if context is None or not g.prompts:
        return
    for i, prompt in enumerate(g.prompts):
        length = len(tokenizer(prompt)["input_ids"])
        if length + g.max_new_tokens > context:
            raise ConfigError(
                f"generation.max_new_tokens: {g.max_new_tokens} new tokens after generation.prompts[{i}] "
                f"({length} tokens) do not fit the model's context of {context} positions"
            )
