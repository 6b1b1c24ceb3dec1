"""Checks run before training starts, for settings that the config loader alone cannot judge: they need the
model's context, its tokenizer or the benchmark files. A run never trains for hours and then fails on them.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from igea.config import IgeaConfig
from igea.errors import ConfigError
from igea.modeling import configured_model_path, model_context_length
from igea.tasks import load_tasks


def check_before_training(cfg: IgeaConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Block size and generation lengths against the model's context; every `eval.tasks` entry readable."""
    context = check_block_size(cfg)
    check_generation_fits(cfg, tokenizer, context)
    load_tasks(cfg.eval.tasks, cfg.eval)  # built-in ones are downloaded now, or fail at once when offline


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
