"""Loading the base model and tokenizer, and building a tiny Mistral for offline demos and tests."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from igea.config import IgeaConfig, ModelConfig, TinyModelConfig, has_tokenizer_files, looks_local, no_tokenizer
from igea.data import read_documents
from igea.errors import ConfigError, IgeaError
from igea.hub import hub_reachable
from igea.progress import bars_off_in_logs
from igea.rundir import TINY_MARKER, share_like_other_files

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configured_model_path(cfg: IgeaConfig) -> str:
    """The model the config names: its hub id / directory, or the tiny model's directory."""
    if cfg.model.name_or_path is not None:
        return cfg.model.name_or_path
    return str(cfg.output_dir / "base-model")


def load_causal_lm(source: str, model_cfg: ModelConfig) -> PreTrainedModel:
    """A causal LM from a hub id or directory, with the configured dtype and attention implementation."""
    kwargs: dict = {"dtype": DTYPES.get(model_cfg.dtype, "auto")}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    model = from_pretrained_or_explain(AutoModelForCausalLM, source, model_cfg, **kwargs)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def load_pretrained(
    path: str, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model in eval mode on `device` (CUDA when available) and its tokenizer, for generation and evaluation.

    `path` is a run directory, a model directory or a hub id; `dtype` defaults to the checkpoint's own.
    """
    dtype = dtype or "auto"
    if dtype not in ("auto", *DTYPES):
        raise ConfigError(f"dtype: {dtype!r} is not allowed; choose one of auto, {', '.join(DTYPES)}")
    if looks_local(path) and not Path(path).is_dir():
        raise IgeaError(f"cannot load model '{path}': no such directory")
    if Path(path).is_dir() and not has_tokenizer_files(path):
        raise IgeaError(f"cannot load model: {no_tokenizer(path)}; copy the tokenizer files of the model it was "
                        "trained from into it")
    model_cfg = ModelConfig(name_or_path=path, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = from_pretrained_or_explain(AutoTokenizer, path, model_cfg)
    model = load_causal_lm(path, model_cfg)
    return to_device(model, device).eval(), tokenizer


def to_device(model: PreTrainedModel, device: str | None) -> PreTrainedModel:
    """`model` moved to `device` (CUDA when available, else CPU); a device that cannot be used is one clear line."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return model.to(torch.device(device))
    except (RuntimeError, AssertionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"device: {device!r} cannot be used: {reason}") from None


def auto_tokenizer(source: str, model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer for the model at `source`: `model.tokenizer` when it is set for this model (a checkpoint
    saved without its tokenizer), at its main revision, else the model's own."""
    if model_cfg.tokenizer is None or source != model_cfg.name_or_path:
        return from_pretrained_or_explain(AutoTokenizer, source, model_cfg)
    try:
        return from_pretrained_or_explain(AutoTokenizer, model_cfg.tokenizer, model_cfg, revision=None)
    except IgeaError as err:
        raise IgeaError(f"model.tokenizer: {err}") from err


def model_context_length(source: str, model_cfg: ModelConfig) -> int | None:
    """The longest sequence the model's positions allow, read from its config alone (no weights)."""
    config = from_pretrained_or_explain(AutoConfig, source, model_cfg)
    return getattr(config, "max_position_embeddings", None)


def from_pretrained_or_explain(loader, source: str, model_cfg: ModelConfig, **kwargs):
    """Call `loader.from_pretrained` and turn hub, network and remote-code failures into one clear line.

    When the hub is unreachable, a hub id is looked up in the local cache only (no retries).
    """
    if not Path(source).is_dir() and not hub_reachable():
        kwargs["local_files_only"] = True
    kwargs.setdefault("revision", model_cfg.revision)
    try:
        return loader.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    except ValueError as err:
        if "instantiate the backend tokenizer" in str(err):  # transformers' own message is cut off at its colon
            raise IgeaError(f"cannot load the tokenizer of '{source}': it has no tokenizer.json, nor a slow "
                            "tokenizer's files to convert (with sentencepiece or tiktoken installed)") from err
        if kwargs.get("local_files_only") and "trust_remote_code" not in str(err):
            raise IgeaError(
                f"cannot load model '{source}': it is not a local directory, not in the local cache, and the "
                "Hugging Face hub is unreachable"
            ) from err
        if "trust_remote_code" in str(err):
            raise IgeaError(
                f"model '{source}' needs custom code from its repository; set model.trust_remote_code: true "
                "only if you trust it"
            ) from err
        raise IgeaError(f"cannot load model '{source}': {_first_line(err)}") from err
    except OSError as err:
        if Path(source).is_dir():
            raise IgeaError(f"cannot load model from directory '{source}': {_first_line(err)}") from err
        if kwargs.get("local_files_only"):
            raise IgeaError(
                f"cannot load model '{source}': it is not a local directory, not in the local cache, and the "
                "Hugging Face hub is unreachable"
            ) from err
        raise IgeaError(
            f"cannot load model '{source}': it is not a local directory and the Hugging Face hub has no such "
            "model (wrong id, or a gated repo without a token)"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------------------------------------
# The tiny model


TOKENIZER_CORPUS_KEYS = ("path", "sources", "name", "split", "revision", "text_column", "max_documents", "min_chars",
                         "encoding_errors")
"""The `data:` settings that decide which documents the tiny model's tokenizer is trained on."""


def ensure_tiny_model(cfg: IgeaConfig) -> Path:
    """Build the tiny base model into `<output_dir>/base-model` unless the one there was built the same way."""
    target = Path(configured_model_path(cfg))
    data = dataclasses.asdict(cfg.data)
    recipe = {"tiny": dataclasses.asdict(cfg.model.tiny), "corpus": {k: data[k] for k in TOKENIZER_CORPUS_KEYS}}
    recipe = json.loads(json.dumps(recipe, default=str))
    marker = target / TINY_MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == recipe:
        return target
    texts = read_documents(cfg.data, limit=20000)  # the corpus trains the tokenizer
    return build_tiny_model(texts, cfg.model.tiny, target, recipe)


@bars_off_in_logs
def build_tiny_model(texts: Iterable[str], shape: TinyModelConfig, out_dir: str | Path,
                     recipe: dict | None = None) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save a randomly initialised tiny Mistral beside it.

    The result is a normal Hugging Face model directory (safetensors weights), loadable by `from_pretrained`;
    `recipe`, when given, is saved beside it (igea_tiny.json) to recognise it later.
    """
    out_dir = Path(out_dir)
    tokenizer = train_bpe_tokenizer(texts, shape.vocab_size)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(shape.seed)
    model = MistralForCausalLM(config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if recipe is not None:
        (tmp / TINY_MARKER).write_text(json.dumps(recipe), encoding="utf-8")
    share_like_other_files(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # built for another shape or corpus
    tmp.replace(out_dir)
    logger.info("built tiny Mistral (%.2fM parameters, vocab %d) in %s", model.num_parameters() / 1e6,
                len(tokenizer), out_dir)
    return out_dir


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no unknown characters) with <s>, </s>, <unk> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.model_max_length = 1_000_000
    return tokenizer
