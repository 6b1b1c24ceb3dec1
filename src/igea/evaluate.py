"""Evaluating a model: loss, perplexity and next-token accuracy on held-out text, and multiple-choice tasks.

Held-out text is packed exactly as training packs it (igea.data), with the run's own packing settings when
the model is a run directory; `compare` scores a second model (the base) on the very same blocks and tasks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase

from igea.blockstore import HeldOut
from igea.config import DataConfig, EvalConfig, data_sources, resolve_local_files
from igea.data import BlockCollator, prepare_corpus, warn_if_small
from igea.errors import ConfigError, IgeaError, show
from igea.metrics import NextTokenMetrics, argmax_and_nll, combined, perplexity
from igea.modeling import load_pretrained
from igea.progress import Progress, bars_off_in_logs, duration
from igea.rundir import run_config
from igea.tasks import check_task_names, context_length, load_task, markdown_table, run_tasks

logger = logging.getLogger(__name__)

PACKING_KEYS = ("block_size", "document_boundary", "packing", "min_chars")
"""What a run's `data:` section says about cleaning and packing; held-out text is packed the same way."""

ModelLike = str | os.PathLike | PreTrainedModel


HeldOutCorpus = str | list[str] | DataConfig | dict[str, str | list[str]]
"""What `evaluate(corpus=...)` takes: files/globs/directories or a hub id (one set), a DataConfig, or named sets."""


@bars_off_in_logs
def evaluate(
    model: ModelLike,
    corpus: HeldOutCorpus | None = None,
    tasks: list[str] | None = None,
    *,
    compare: ModelLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    eval_config: EvalConfig | None = None,
    block_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Held-out metrics on `corpus` and multiple-choice `tasks` for a model, and for `compare` beside it.

    `model` is a run directory, a model directory, a hub id or a loaded model (then pass its `tokenizer`).
    `corpus` is what `data.path` takes (files, globs, directories, a hub id), a whole DataConfig, or named
    held-out sets `{"biomed": "a.txt", "general": ["b.txt", "c.txt"]}`, each evaluated on its own. Blocks are
    `block_size` tokens: by default the run's own, else the model's context up to 2048, prepared once on disk as
    training prepares them, in `<cache_dir>/igea-blocks` (default: the datasets cache, `HF_DATASETS_CACHE`; a
    DataConfig's own `cache_dir` unless this one is given). `eval_config` gives the tasks' few-shot count, limit and
    batch size. Returns
    JSON-ready results: `{"models": {name: {"held_out": ..., "held_out_sets": ..., "tasks": ...}},
    "held_out_data": ..., "change": ..., "table": ...}`; `held_out` is over all sets (token-weighted) and
    `held_out_sets` (named sets only) holds each set's.
    """
    eval_config = eval_config or EvalConfig()
    tasks = list(tasks if tasks is not None else eval_config.tasks)
    check_task_names(tasks, key="tasks")
    if corpus is None and not tasks:
        raise IgeaError("evaluate: nothing to do; give a held-out corpus, tasks, or both")
    if isinstance(corpus, dict):
        check_set_names(corpus)
    loaded = [load_task(name, eval_config.num_fewshot, eval_config.limit) for name in tasks]  # fail early
    sources = [model] if compare is None else [model, compare]
    names = _display_names(sources)
    results: dict[str, Any] = {"models": {}}
    blocks: dict[str, Dataset] = {}
    reference_vocab: dict[str, int] | None = None
    for index, (name, source) in enumerate(zip(names, sources, strict=True)):
        role = "the base model (compare)" if index else "the model"
        logger.info("evaluating %s %s", role, name)
        started = time.monotonic()
        lm, tok = load_for_eval(source, tokenizer, device, dtype)
        entry: dict[str, Any] = {}
        if corpus is not None:
            context = context_length(lm, tok)
            if not blocks:
                sets = held_out_sets(corpus, source, block_size, context, cache_dir)
                check_block_fits(next(iter(sets.values())).block_size, context, name)
                warn_if_trained_on(source, sets)
                prepared = {set_name: held_out_blocks(tok, data, set_name) for set_name, data in sets.items()}
                blocks = {set_name: b for set_name, (b, _) in prepared.items()}
                results["held_out_data"] = held_out_data_stats({n: stats for n, (_, stats) in prepared.items()})
                reference_vocab = tok.get_vocab()
            elif tok.get_vocab() != reference_vocab:
                raise IgeaError(f"compare: '{name}' has another tokenizer than '{names[0]}'; "
                                "held-out metrics need the same token blocks for both")
            else:
                check_block_fits(results["held_out_data"]["block_size"], context, name)
            per_set = {set_name: held_out_metrics(lm, b, eval_config.batch_size,
                                                  what=f"{name}: held-out set '{set_name}'" if set_name else name)
                       for set_name, b in blocks.items()}
            entry["held_out"] = combined(list(per_set.values())) if len(per_set) > 1 else next(iter(per_set.values()))
            if isinstance(corpus, dict):
                entry["held_out_sets"] = per_set
        if tasks:
            entry["tasks"] = run_tasks(lm, tok, loaded, eval_config)
        results["models"][name] = entry
        logger.info("evaluated %s in %s", name, duration(time.monotonic() - started))
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
    corpus: str | list[str] | DataConfig, source: ModelLike, block_size: int | None, context: int,
    cache_dir: str | os.PathLike | None = None,
) -> DataConfig:
    """The DataConfig of a held-out corpus: the run's packing, `block_size` if given, blocks <= context, prepared
    in `cache_dir` if given."""
    if isinstance(corpus, DataConfig):
        data = corpus
    else:
        settings = run_packing(source)
        settings.setdefault("block_size", min(DataConfig.block_size, context))
        data = DataConfig(path=corpus, validation_split=0, **settings)
    if block_size is not None:
        data = dataclasses.replace(data, block_size=block_size)
    if cache_dir is not None:
        data = dataclasses.replace(data, cache_dir=os.fspath(cache_dir))
    if data.block_size < 2:
        raise ConfigError(f"block_size: {data.block_size!r} is not allowed; it must be at least 2")
    return data


def held_out_sets(corpus: HeldOutCorpus, source: ModelLike, block_size: int | None, context: int,
                  cache_dir: str | os.PathLike | None = None) -> dict[str, DataConfig]:
    """Each held-out set's DataConfig, by name (one unnamed set, "", unless `corpus` names them)."""
    named = corpus if isinstance(corpus, dict) else {"": corpus}
    return {name: held_out_data_config(paths, source, block_size, context, cache_dir)
            for name, paths in named.items()}


def check_set_names(corpus: dict[str, Any]) -> None:
    """Named held-out sets: at least one, each name an identifier (it names metrics, as in training)."""
    if not corpus:
        raise ConfigError("corpus: {} names no held-out set; map names to files, e.g. {'general': 'general.txt'}")
    for name in corpus:
        if not (isinstance(name, str) and name.isidentifier() and name.isascii()):
            raise ConfigError(f"corpus: {show(name)} is not allowed as the name of a held-out set; use letters, "
                              "digits and _ (not first a digit)")


def check_block_fits(block_size: int, context: int, name: str) -> None:
    if block_size > context:
        raise ConfigError(
            f"block_size: {block_size} is longer than the context of '{name}' ({context} positions)"
        )


def held_out_blocks(tokenizer: PreTrainedTokenizerBase, data: DataConfig,
                    name: str = "") -> tuple[Dataset, dict[str, Any]]:
    """A held-out corpus cleaned, tokenized and cut into blocks as training does it (prepared once on disk and
    memory-mapped, like a run's corpus), with its counts."""
    source = data_sources(data)[0]
    prepared = prepare_corpus(data, source, tokenizer, HeldOut(0))
    stats = dict(prepared.manifest["kept"])
    if stats["blocks"] == 0:
        what = f"corpus '{name}'" if name else "corpus"
        raise IgeaError(
            f"{what}: {stats['tokens']} tokens, fewer than one block of {data.block_size}; "
            "give more text or a smaller block size"
        )
    stats.update(corpus=data.path, block_size=data.block_size, packing=data.packing)
    logger.info("held-out%s: %d documents -> %d blocks of %d", f" set '{name}'" if name else "", stats["documents"],
                stats["blocks"], data.block_size)
    warn_if_small(name or "corpus", stats["blocks"], data.block_size, "the block size (--block-size, block_size=)")
    return prepared.kept, stats


def held_out_data_stats(per_set: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The held-out data's counts: of the one set, or summed over named sets (each set's under `sets`)."""
    if list(per_set) == [""]:
        return per_set[""]
    first = next(iter(per_set.values()))
    total = {key: sum(stats[key] for stats in per_set.values()) for key in ("documents", "tokens", "blocks",
                                                                            "remainder")}
    return {**total, "block_size": first["block_size"], "packing": first["packing"], "sets": per_set}


def warn_if_trained_on(source: ModelLike, sets: dict[str, DataConfig]) -> None:
    """Warn when a held-out set shares files with the training corpus of the run being evaluated: its numbers
    would be measured on training data."""
    config = None if isinstance(source, PreTrainedModel) else run_config(source)
    if not config:
        return
    data = config.get("data") or {}
    paths = [data["path"]] if data.get("path") else [s["path"] for s in data.get("sources") or []]
    trained: set[str] = set()
    for path in paths:
        try:
            trained.update(os.path.abspath(f) for f in resolve_local_files(path, "data.path") or [])
        except ConfigError:  # the run's files are gone: nothing to compare with
            continue
    for name, held in sets.items():
        files = resolve_local_files(held.path, "corpus") if held.path is not None else None
        shared = sorted({os.path.abspath(f) for f in files or []} & trained)
        if shared:
            what = f"held-out set '{name}'" if name else "the held-out corpus"
            logger.warning("%s includes '%s', which run '%s' trained on: these are not held-out numbers (use text "
                           "the run never saw)", what, shared[0], source)


@torch.inference_mode()
def held_out_metrics(model: PreTrainedModel, blocks: Dataset, batch_size: int = 8,
                     what: str = "held-out") -> dict[str, float]:
    """Mean next-token loss, perplexity and accuracy over every predicted token of `blocks`.

    Targets are what the training collator makes them (no prediction across documents with
    `packing: documents`); the loss is averaged over tokens, not over batches. Progress (`what`) is a bar in a
    terminal, lines with percent and ETA in a log file.
    """
    model.eval()
    tally = NextTokenMetrics()  # the definitions the trainer's evaluation uses
    loader = DataLoader(blocks, batch_size=batch_size, collate_fn=BlockCollator())
    logger.info("%s: %d blocks", what, len(blocks))
    with Progress(what, len(loader), "batches", logger=logger, say_done=False) as progress:
        for batch in loader:
            labels = batch.pop("labels").to(model.device)
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}, use_cache=False).logits
            tally(EvalPrediction(predictions=argmax_and_nll(logits, labels), label_ids=labels),
                  compute_result=False)
            progress.update()
    result = tally.result()
    loss = result["token_loss"]
    return {"loss": loss, "perplexity": perplexity(loss), "accuracy": result["accuracy"], "tokens": result["tokens"]}


def changes(model: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """model - base for every held-out metric (of all sets, and of each named set) and every task's acc and
    acc_norm."""
    change: dict[str, Any] = {}
    keys = ("loss", "perplexity", "accuracy")
    if "held_out" in model:
        change["held_out"] = {k: model["held_out"][k] - base["held_out"][k] for k in keys}
    if "held_out_sets" in model:
        change["held_out_sets"] = {name: {k: m[k] - base["held_out_sets"][name][k] for k in keys}
                                   for name, m in model["held_out_sets"].items()}
    if "tasks" in model:
        change["tasks"] = {
            task: {k: result[k] - base["tasks"][task][k] for k in ("acc", "acc_norm")}
            for task, result in model["tasks"].items()
        }
    return change


# ----------------------------------------------------------------------------------------------------------
# igea eval


def format_results(results: dict[str, Any]) -> str:
    """Held-out metrics (a line per model and held-out set, then the change) and the tasks' table, as
    `igea eval` prints them."""
    lines = []
    models = results["models"]
    if "held_out_data" in results:
        d = results["held_out_data"]
        sets = list(d.get("sets", {}))
        lines.append(f"held-out: {d['documents']} documents in {d['blocks']} blocks of {d['block_size']}"
                     + (f" ({len(sets)} sets: {', '.join(sets)})" if sets else ""))
        rows: list[tuple[str, str, dict[str, float], str]] = []
        for name, entry in models.items():
            rows += [(name, s, entry["held_out_sets"][s], "") for s in sets]
            rows.append((name, "all" if sets else "", entry["held_out"], ""))
        if "change" in results:
            change = results["change"]
            rows += [("change", s, change["held_out_sets"][s], "+") for s in sets]
            rows.append(("change", "all" if sets else "", change["held_out"], "+"))
        width = max(len(n) for n, *_ in rows)
        set_width = max((len(s) for _, s, *_ in rows), default=0)
        column = f"{'set':{set_width}}  " if sets else ""
        lines.append(f"{'':{width}}  {column}{'loss':>9} {'perplexity':>11} {'accuracy':>9}")
        for name, set_name, m, sign in rows:
            cell = f"{set_name:{set_width}}  " if sets else ""
            lines.append(f"{name:{width}}  {cell}{m['loss']:>{sign}9.4f} {m['perplexity']:>{sign}11.3f} "
                         f"{m['accuracy']:>{sign}9.4f}")
    if "table" in results:
        lines += ["", results["table"]] if lines else [results["table"]]
    return "\n".join(lines)
