"""Evaluating a model: loss, perplexity and next-token accuracy on held-out text, and multiple-choice tasks.

Held-out text is packed exactly as training packs it (igea.data), with the run's own packing settings when
the model is a run directory; `compare` scores a second model (the base) on the very same blocks and tasks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase

from igea.config import DataConfig, EvalConfig
from igea.data import BlockCollator, clean_corpus, load_corpus, pack_blocks, tokenize_corpus
from igea.errors import ConfigError, IgeaError
from igea.metrics import NextTokenMetrics, argmax_and_nll, perplexity
from igea.modeling import load_pretrained
from igea.rundir import run_config
from igea.tasks import check_task_names, context_length, load_task, markdown_table, run_tasks

logger = logging.getLogger(__name__)

PACKING_KEYS = ("block_size", "document_boundary", "packing", "min_chars")
"""What a run's `data:` section says about cleaning and packing; held-out text is packed the same way."""

ModelLike = str | os.PathLike | PreTrainedModel


def evaluate(
    model: ModelLike,
    corpus: str | list[str] | DataConfig | None = None,
    tasks: list[str] | None = None,
    *,
    compare: ModelLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    eval_config: EvalConfig | None = None,
    block_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Held-out metrics on `corpus` and multiple-choice `tasks` for a model, and for `compare` beside it.

    `model` is a run directory, a model directory, a hub id or a loaded model (then pass its `tokenizer`).
    `corpus` is what `data.path` takes (files, globs, directories, a hub id) or a whole DataConfig. Blocks are
    `block_size` tokens: by default the run's own, else the model's context up to 2048. `eval_config` gives
    the tasks' few-shot count, limit and batch size. Returns JSON-ready results:
    `{"models": {name: {"held_out": ..., "tasks": ...}}, "held_out_data": ..., "change": ..., "table": ...}`.
    """
    eval_config = eval_config or EvalConfig()
    tasks = list(tasks if tasks is not None else eval_config.tasks)
    check_task_names(tasks, key="tasks")
    if corpus is None and not tasks:
        raise IgeaError("evaluate: nothing to do; give a held-out corpus, tasks, or both")
    loaded = [load_task(name, eval_config.num_fewshot, eval_config.limit) for name in tasks]  # fail early
    sources = [model] if compare is None else [model, compare]
    names = _display_names(sources)
    results: dict[str, Any] = {"models": {}}
    blocks: Dataset | None = None
    reference_vocab: dict[str, int] | None = None
    for name, source in zip(names, sources, strict=True):
        lm, tok = load_for_eval(source, tokenizer, device, dtype)
        entry: dict[str, Any] = {}
        if corpus is not None:
            if blocks is None:
                data = held_out_data_config(corpus, source, block_size, context_length(lm, tok))
                check_block_fits(data.block_size, context_length(lm, tok), name)
                blocks, results["held_out_data"] = held_out_blocks(tok, data)
                reference_vocab = tok.get_vocab()
            elif tok.get_vocab() != reference_vocab:
                raise IgeaError(f"compare: '{name}' has another tokenizer than '{names[0]}'; "
                                "held-out metrics need the same token blocks for both")
            else:
                check_block_fits(results["held_out_data"]["block_size"], context_length(lm, tok), name)
            entry["held_out"] = held_out_metrics(lm, blocks, eval_config.batch_size)
        if tasks:
            entry["tasks"] = run_tasks(lm, tok, loaded, eval_config)
        results["models"][name] = entry
        del lm
    if compare is not None:
        results["change"] = changes(*results["models"].values())
    if tasks:
        results["table"] = markdown_table({name: entry["tasks"] for name, entry in results["models"].items()})
    return results


def _display_names(sources: list[ModelLike]) -> list[str]:
    names = [str(s) if not isinstance(s, PreTrainedModel) else s.name_or_path or "model" for s in sources]
    if len(names) == 2 and names[0] == names[1]:
        names[1] += " (base)"
    return names


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_for_eval(
    source: ModelLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model in eval mode and its tokenizer; a path or hub id is loaded onto `device` (CUDA if any)."""
    if isinstance(source, PreTrainedModel):
        if tokenizer is None:
            raise IgeaError("evaluate: a loaded model needs its tokenizer (tokenizer=...)")
        return source.eval(), tokenizer
    model, own_tokenizer = load_pretrained(str(source), device, dtype)
    return model, tokenizer or own_tokenizer


def run_packing(source: ModelLike) -> dict[str, Any]:
    """The packing settings of the run in directory `source` (empty when it is not a run directory)."""
    config = None if isinstance(source, PreTrainedModel) else run_config(source)
    data = (config or {}).get("data", {})
    return {k: data[k] for k in PACKING_KEYS if k in data}


# ----------------------------------------------------------------------------------------------------------
# Held-out metrics


def held_out_data_config(
    corpus: str | list[str] | DataConfig, source: ModelLike, block_size: int | None, context: int
) -> DataConfig:
    """The DataConfig of the held-out corpus: the run's packing, `block_size` if given, blocks <= context."""
    if isinstance(corpus, DataConfig):
        data = corpus
    else:
        settings = run_packing(source)
        settings.setdefault("block_size", min(DataConfig.block_size, context))
        data = DataConfig(path=corpus, validation_split=0, **settings)
    if block_size is not None:
        data = dataclasses.replace(data, block_size=block_size)
    if data.block_size < 2:
        raise ConfigError(f"block_size: {data.block_size!r} is not allowed; it must be at least 2")
    return data


def check_block_fits(block_size: int, context: int, name: str) -> None:
    if block_size > context:
        raise ConfigError(
            f"block_size: {block_size} is longer than the context of '{name}' ({context} positions)"
        )


def held_out_blocks(tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> tuple[Dataset, dict[str, Any]]:
    """The corpus cleaned, tokenized and cut into blocks as training does it, with its counts."""
    documents = clean_corpus(load_corpus(data), data)
    tokens = tokenize_corpus(documents, tokenizer, data)
    blocks, stats = pack_blocks(tokens, data.block_size, data.packing, data.cache_dir)
    if stats["blocks"] == 0:
        raise IgeaError(
            f"corpus: {stats['tokens']} tokens, fewer than one block of {data.block_size}; "
            "give more text or a smaller block size"
        )
    stats.update(corpus=data.path, documents=len(documents), block_size=data.block_size, packing=data.packing)
    logger.info("held-out: %d documents -> %d blocks of %d", len(documents), stats["blocks"], data.block_size)
    return blocks, stats


@torch.inference_mode()
def held_out_metrics(model: PreTrainedModel, blocks: Dataset, batch_size: int = 8) -> dict[str, float]:
    """Mean next-token loss, perplexity and accuracy over every predicted token of `blocks`.

    Targets are what the training collator makes them (no prediction across documents with
    `packing: documents`); the loss is averaged over tokens, not over batches.
    """
    model.eval()
    tally = NextTokenMetrics()  # the definitions the trainer's evaluation uses
    for batch in DataLoader(blocks, batch_size=batch_size, collate_fn=BlockCollator()):
        labels = batch.pop("labels").to(model.device)
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}, use_cache=False).logits
        tally(EvalPrediction(predictions=argmax_and_nll(logits, labels), label_ids=labels), compute_result=False)
    result = tally.result()
    loss = result["token_loss"]
    return {"loss": loss, "perplexity": perplexity(loss), "accuracy": result["accuracy"], "tokens": result["tokens"]}


def changes(model: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """model - base for every held-out metric and every task's acc and acc_norm."""
    change: dict[str, Any] = {}
    if "held_out" in model:
        keys = ("loss", "perplexity", "accuracy")
        change["held_out"] = {k: model["held_out"][k] - base["held_out"][k] for k in keys}
    if "tasks" in model:
        change["tasks"] = {
            task: {k: result[k] - base["tasks"][task][k] for k in ("acc", "acc_norm")}
            for task, result in model["tasks"].items()
        }
    return change


# ----------------------------------------------------------------------------------------------------------
# igea eval


def format_results(results: dict[str, Any]) -> str:
    """Held-out metrics (a line per model, then the change) and the tasks' table, as `igea eval` prints."""
    lines = []
    models = results["models"]
    width = max(len(n) for n in [*models, "change"])
    if "held_out_data" in results:
        d = results["held_out_data"]
        lines.append(f"held-out: {d['documents']} documents in {d['blocks']} blocks of {d['block_size']}")
        lines.append(f"{'':{width}}  {'loss':>9} {'perplexity':>11} {'accuracy':>9}")
        rows = [(name, entry["held_out"], "") for name, entry in models.items()]
        if "change" in results:
            rows.append(("change", results["change"]["held_out"], "+"))
        for name, m, sign in rows:
            lines.append(f"{name:{width}}  {m['loss']:>{sign}9.4f} {m['perplexity']:>{sign}11.3f} "
                         f"{m['accuracy']:>{sign}9.4f}")
    if "table" in results:
        lines += ["", results["table"]] if lines else [results["table"]]
    return "\n".join(lines)
