"""The run's base model: the model the config names, the tiny Mistral igea builds on the fly (`model.tiny`), or
a copy of either with a domain vocabulary (`model.extend_vocabulary`). What `igea.load_model` and training load.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from igea.config import IgeaConfig
from igea.errors import ConfigError, IgeaError
from igea.modeling import (
    auto_tokenizer,
    configured_model_path,
    ensure_tiny_model,
    from_pretrained_or_explain,
    load_causal_lm,
)
from igea.progress import bars_off_in_logs
from igea.vocab import ensure_extended_model


def base_model_path(cfg: IgeaConfig) -> str:
    """Where the run's base model is, building the tiny model and the extended one first if the config asks."""
    if cfg.model.tiny is not None:
        ensure_tiny_model(cfg)
    if cfg.model.extend_vocabulary is not None:
        return str(ensure_extended_model(cfg))
    return configured_model_path(cfg)


def load_tokenizer(cfg: IgeaConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the base model (or `model.tokenizer`); it must define an EOS token to mark document
    boundaries, and give no id beyond the model's embeddings."""
    source = base_model_path(cfg)
    tokenizer = auto_tokenizer(source, cfg.model)
    if tokenizer.eos_token_id is None:
        raise IgeaError(f"tokenizer of '{source}' has no EOS token; igea needs one to separate documents")
    if cfg.model.tokenizer is not None and source == cfg.model.name_or_path:
        rows = getattr(from_pretrained_or_explain(AutoConfig, source, cfg.model), "vocab_size", None)
        if rows is not None and len(tokenizer) > rows:
            raise ConfigError(f"model.tokenizer: '{cfg.model.tokenizer}' has {len(tokenizer):,} tokens, more than "
                              f"the {rows:,} embeddings of '{source}'; is it the tokenizer the model was trained with?")
    return tokenizer


@bars_off_in_logs
def load_model(cfg: IgeaConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base causal LM and its tokenizer as the `model:` section says.

    Builds the tiny model (from the corpus) and the extended vocabulary first when the config asks and they
    are not there yet.
    """
    tokenizer = load_tokenizer(cfg)
    return load_causal_lm(base_model_path(cfg), cfg.model), tokenizer
