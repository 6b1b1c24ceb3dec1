"""Corpus -> clean documents -> token ids -> fixed-length blocks.

The steps, each a small function: `load_corpus` (hub id or local txt/jsonl/parquet/csv), `clean_corpus`,
`split_corpus`, `tokenize_corpus` (a document boundary after every document) and `pack_blocks`
(every token kept, in order, in `block_size` blocks with no padding). `prepare_dataset` runs them all.

A map-style corpus is prepared once on disk (`prepare_corpus`, igea.blockstore): its documents are read as a
stream, tokenized in `data.num_proc` processes and cut into blocks that every rank and every later run
memory-maps, keyed by everything that changes them. A streamed corpus (`data.streaming`) is tokenized and
packed on the fly instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import (
    Dataset,
    Features,
    IterableDataset,
    List,
    Value,
    concatenate_datasets,
    load_dataset,
)
from transformers import PreTrainedTokenizerBase

from igea.blockstore import (
    DocumentEncoder,
    HeldOut,
    PreparedBlocks,
    build_blocks,
    cache_key,
    document_ids,
    open_or_build,
    tokenizer_fingerprint,
)
from igea.config import (
    HELD_OUT_TEXTS,
    DataConfig,
    IgeaConfig,
    SourceConfig,
    data_sources,
    resolve_local_files,
    source_name,
    source_names,
    split_sources,
)
from igea.errors import IgeaError
from igea.hub import hub_reachable
from igea.metrics import IGNORE_INDEX
from igea.progress import Progress
from igea.streaming import BlockStream

logger = logging.getLogger(__name__)

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
PMID_PREFIX = re.compile(r"^\s*\d+\s*\|")
READ_BATCH = 1000  # documents read, cleaned and tokenized together
SMALL_SET_BLOCKS = 20
"""A held-out set of fewer blocks than this gives a loss that moves with its few texts more than with the model."""


@dataclass
class PreparedData:
    """Packed train blocks and the held-out sets' blocks, with the counts that show nothing was lost on the way.

    `validation_sets` maps each held-out set's name to its blocks: each source's share held out by
    `data.validation_split`, then each set `data.validation_path` names. `stats["cache"]` says whether this
    process tokenized the corpus ("built") or opened blocks prepared before ("loaded"); `stats["prepared"]`
    says where they are.
    """

    train: Dataset | IterableDataset
    validation_sets: dict[str, Dataset] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def validation(self) -> Dataset | None:
        """Every held-out block in one Dataset (the sets one after the other), or None without a held-out set."""
        sets = list(self.validation_sets.values())
        if len(sets) <= 1:
            return sets[0] if sets else None
        return concatenate_datasets(sets)


def prepare_dataset(cfg: IgeaConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Load, clean, split, tokenize and pack the corpus (or the weighted corpora) the `data:` section names,
    and each held-out set.

    The blocks are prepared once on disk and memory-mapped (`prepare_corpus`). With `data.streaming` the train
    split is an iterable read, tokenized and packed on the fly; each held-out set is a small in-memory set of
    blocks.
    """
    d = cfg.data
    seed = d.seed if d.seed is not None else cfg.training.get("seed", 42)
    warn_if_training_on_held_out_texts(d)
    if not d.streaming:
        return prepare_blocks(d, tokenizer, seed)
    sources = data_sources(d)
    split = d.validation_split if split_sources(d) else 0
    train_parts, held_documents = [], {}
    for source in sources:
        with explained_errors(d, source):
            parts = split_corpus(clean_corpus(load_corpus(d, source), d), split, seed)
        train_parts.append(parts["train"])
        if "validation" in parts:
            held_documents[source_name(source)] = parts["validation"]
    for name, source in validation_sources(d).items():
        with explained_errors(d, source):
            held_documents[name] = clean_corpus(load_corpus(d, source, streaming=False), d)
    sets = {name: pack_split(documents, tokenizer, d) for name, documents in held_documents.items()}
    names = [source_name(s) for s in sources]
    train = BlockStream(train_parts, names, [s.weight for s in sources], tokenizer, d, seed,
                        explain=lambda index: explained_errors(d, sources[index]),
                        max_tokens=[s.max_tokens for s in sources])
    for name, source in zip(names, sources, strict=True):
        if source.max_tokens is not None:
            logger.info("%s: streamed in passes of its first %s blocks (max_tokens %s // data.block_size %d), each "
                        "pass in a new order", name, f"{source.max_tokens // d.block_size:,}",
                        f"{source.max_tokens:,}", d.block_size)
    stats = {"train": {"streaming": True, "sources": names, **({"mix": d.mix} if len(sources) > 1 else {})},
             **held_out_stats(sets, d)}
    return PreparedData(train, {name: blocks for name, (blocks, _) in sets.items()}, stats)


def validation_sources(d: DataConfig) -> dict[str, SourceConfig]:
    """The held-out sets read from their own files (`data.validation_path`), by name."""
    if d.validation_path is None:
        return {}
    paths = d.validation_path if isinstance(d.validation_path, dict) else {"validation": d.validation_path}
    return {name: SourceConfig(path=path, text_column=d.text_column, name=d.name, split=d.split, label=name)
            for name, path in paths.items()}


def held_out_stats(sets: dict[str, tuple[Dataset, dict[str, int]]], d: DataConfig) -> dict[str, Any]:
    """`stats["validation"]`: the counts of all held-out sets together; `stats["validation_sets"]`: each set's,
    when there are two or more. A set too short for one block is refused, by name."""
    if not sets:
        return {}
    checked = {name: checked_counts(f"the held-out set '{name}'" if len(sets) > 1 else "the validation split",
                                    counts, d) for name, (_, counts) in sets.items()}
    for name, counts in checked.items():
        warn_if_small(name, counts["blocks"], d.block_size, "data.block_size")
    if len(sets) == 1:
        return {"validation": next(iter(checked.values()))}
    total = {key: sum(c[key] for c in checked.values()) for key in ("documents", "tokens", "blocks", "remainder")}
    return {"validation": total, "validation_sets": checked}


def warn_if_small(name: str, blocks: int, block_size: int, block_key: str) -> None:
    """One warning for a held-out set of fewer than SMALL_SET_BLOCKS blocks: its loss is noise more than signal
    (`block_key` names the setting that sets the block size where the warning arises)."""
    if blocks < SMALL_SET_BLOCKS:
        logger.warning("held-out set '%s' has only %d blocks of %d tokens (fewer than %d): its loss moves with "
                       "its few texts more than with the model; give it more text or lower %s", name,
                       blocks, block_size, SMALL_SET_BLOCKS, block_key)


def warn_if_training_on_held_out_texts(d: DataConfig) -> None:
    """One warning per training source that is a shipped held-out text (`igea:general`, `igea:general-en`): a few
    thousand tokens, which replay would repeat pass after pass, and which then no longer measure anything held
    out."""
    for i, source in enumerate(data_sources(d)):
        if source.path in HELD_OUT_TEXTS:
            key = f"data.sources[{i}].path" if d.sources else "data.path"
            logger.warning("%s: %s is a held-out set shipped with igea, not a training corpus: replay repeats its "
                           "few thousand tokens again and again, and it no longer measures forgetting; replay from "
                           "a real general corpus (README, Measuring forgetting)", key, source.path)


# ----------------------------------------------------------------------------------------------------------
# Preparation on disk


def prepare_blocks(d: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Train blocks and held-out sets of a map-style corpus, each source and set prepared once and memory-mapped."""
    sources = data_sources(d)
    held_out = HeldOut(d.validation_split if split_sources(d) else 0, seed)
    corpora = [prepare_corpus(d, source, tokenizer, held_out) for source in sources]
    blocks, per_source = [], {}
    sets: dict[str, tuple[Dataset, dict[str, int]]] = {}
    for corpus, source in zip(corpora, sources, strict=True):
        name = source_name(source)
        what = f"the train split of '{name}'" if len(sources) > 1 else "the train split"
        per_source[name] = checked_counts(what, corpus.manifest["kept"], d)
        blocks.append(corpus.kept)
        if corpus.held_out is not None:
            sets[name] = (corpus.held_out, corpus.manifest["held_out"])
    for name, source in validation_sources(d).items():
        corpora.append(prepare_corpus(d, source, tokenizer, HeldOut(0, seed)))
        sets[name] = (corpora[-1].kept, corpora[-1].manifest["kept"])
    stats: dict[str, Any] = held_out_stats(sets, d)
    budget = -(-d.token_budget // d.block_size) if d.token_budget else None
    train, draws = mix_blocks(blocks, sources, seed, d.mix, budget)
    stats["train"] = summed_stats(per_source, len(train), draws, sources, "token_budget" if budget else d.mix)
    stats["cache"] = "built" if any(c.cache == "built" for c in corpora) else "loaded"
    stats["prepared"] = {"dirs": [str(c.path) for c in corpora], "token_dtype": corpora[0].manifest["token_dtype"]}
    return PreparedData(train, {name: blocks for name, (blocks, _) in sets.items()}, stats)


def prepare_corpus(d: DataConfig, source: SourceConfig, tokenizer: PreTrainedTokenizerBase,
                   held_out: HeldOut) -> PreparedBlocks:
    """The blocks of one source (and of its held-out documents), tokenized once and kept on disk.

    They live in `<data.cache_dir or the datasets cache>/igea-blocks/<key>`, the key a hash of everything that
    changes them: the corpus files (path, size, modification time) or hub id, text column, cleaning, boundary,
    block size, packing, the held-out split and its seed, and the tokenizer.
    """
    settings = {
        "corpus": corpus_identity(d, source),
        "text_column": source.text_column or d.text_column,
        "max_documents": document_limit(d, source),
        "min_chars": d.min_chars,
        "encoding_errors": d.encoding_errors,
        "document_boundary": d.document_boundary,
        "block_size": d.block_size,
        "packing": d.packing,
        "held_out": {"split": held_out.split, "seed": held_out.seed} if held_out.split else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    if source.max_tokens is not None:  # only when set: the blocks prepared before the key existed stay valid
        settings["max_tokens"] = source.max_tokens

    def build(directory: Path) -> dict[str, Any]:
        logger.info("%s: tokenizing into blocks of %d tokens (once: later runs reuse them)", source_name(source),
                    d.block_size)
        encoder = DocumentEncoder(tokenizer, d.document_boundary)
        batches = document_batches(d, source)
        first = next(batches)
        encoder.check(first[:16])
        return build_blocks(chain([first], batches), encoder, directory, block_size=d.block_size,
                            packing=d.packing, held_out=held_out, num_proc=d.num_proc or 1,
                            max_tokens=source.max_tokens,
                            cap_key=max_tokens_key(d, source))

    prepared = open_or_build(prepared_root(d), cache_key(settings), settings, build)
    logger.info("%s: %s blocks in %s", source_name(source), prepared.cache, prepared.path)
    return prepared


def max_tokens_key(d: DataConfig, source: SourceConfig) -> str:
    """The config key of `source`'s `max_tokens`, for an error: `data.sources[1].max_tokens`."""
    names = source_names(d)
    name = source_name(source)
    return f"data.sources[{names.index(name)}].max_tokens" if name in names else "max_tokens"


def document_limit(d: DataConfig, source: SourceConfig) -> int | None:
    """How many documents of `source` are read at most: its own `max_documents`, else `data.max_documents`."""
    return source.max_documents if source.max_documents is not None else d.max_documents


def prepared_root(d: DataConfig) -> Path:
    """Where prepared blocks are kept: `data.cache_dir`, else the datasets cache (HF_DATASETS_CACHE)."""
    import datasets

    return Path(d.cache_dir or datasets.config.HF_DATASETS_CACHE) / "igea-blocks"


def corpus_identity(d: DataConfig, source: SourceConfig) -> dict[str, Any]:
    """What names a corpus's content: each local file's path, size and modification time, or the hub id."""
    files = resolve_local_files(source.path, "data.path")
    if files is None:
        return {"hub": source.path, "name": source.name, "split": source.split, "revision": d.revision}
    return {"files": [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]}


def checked_counts(what: str, counts: dict[str, int], d: DataConfig) -> dict[str, int]:
    """A split's counts (`what`: "the train split", "the held-out set 'general'"), refusing one too short for a
    single block."""
    logger.info("%s: %d documents, %d tokens -> %d blocks of %d (%d tokens left over at the end)",
                what.removeprefix("the "), counts["documents"], counts["tokens"], counts["blocks"], d.block_size,
                counts["remainder"])
    if counts["blocks"] == 0:
        raise IgeaError(
            f"data: {what} has {counts['tokens']} tokens, fewer than one block of "
            f"data.block_size={d.block_size}; lower the block size or give it more text"
        )
    return dict(counts)


def document_batches(d: DataConfig, source: SourceConfig, batch_size: int = READ_BATCH,
                     report: bool = True) -> Iterator[list[str]]:
    """The cleaned texts of one source, in order, `batch_size` documents at a time.

    The files are read as a stream: nothing is loaded whole or copied into a cache. Cleaning is
    `clean_corpus`'s: whitespace stripped, documents shorter than `data.min_chars` dropped. With `report`, what
    was kept and dropped is logged at the end; records without text (a JSON line without the text field, a null
    value) are counted apart and the first one is named with its file and line.
    """
    column = source.text_column or d.text_column
    min_chars = max(d.min_chars, 1)
    limit = document_limit(d, source)
    files = resolve_local_files(source.path, "data.path")
    strip_pmid = files is not None and file_format(files[0]) == "text"
    read = kept = missing = 0
    with explained_errors(d, source):
        dataset = _open_files(files, d, streaming=True) if files else _load_hub(source, d, streaming=True)
        _check_column(dataset, column, files[0] if files else str(source.path))
        watch = report and source.max_tokens is None  # a token cap: build_blocks counts the cap's tokens instead
        total, exact = estimated_documents(files, dataset, limit) if watch else (None, True)
        progress = Progress(f"{source_name(source)}: reading", total, "documents" if exact else "documents (estimated)",
                            logger=logger, bar=watch, every=None if watch else math.inf, say_done=False)
        for batch in dataset.select_columns([column]).iter(batch_size=batch_size):
            texts = batch[column]
            if limit is not None:
                texts = texts[: limit - read]
            _check_texts(texts)
            read += len(texts)
            progress.update(len(texts))
            missing += sum(t is None for t in texts)
            if strip_pmid:
                texts = [PMID_PREFIX.sub("", t, count=1) for t in texts]
            texts = [s for s in ((t or "").strip() for t in texts) if len(s) >= min_chars]
            kept += len(texts)
            if texts:
                yield texts
            if limit is not None and read >= limit:
                break
        progress.close()
    if report:
        reasons = [f"{read - kept - missing} empty or shorter than {min_chars} characters"]
        if missing:
            first = _first_without_text(files, d, column)
            reasons.insert(0, f"{missing} without a '{column}' value" + (f", the first in {first}" if first else ""))
        log = logger.warning if missing else logger.info
        log("%s: kept %d of %d documents (dropped: %s)", source_name(source), kept, read, "; ".join(reasons))
    if kept == 0:
        raise IgeaError(f"data: the corpus has no documents of at least {min_chars} characters ({read} read)")


ESTIMATE_SAMPLE_BYTES = 1 << 22
"""How much of a text, JSON-lines or CSV file is read to estimate its documents from its size."""


def estimated_documents(files: list[str] | None, dataset: Any, max_documents: int | None) -> tuple[int | None, bool]:
    """(documents the corpus holds, exact?), for a reading's progress: parquet files and hub datasets say so in
    their metadata; a text, JSON-lines or CSV file is estimated from its size and the lines in its first 4 MiB
    (one document a line); a compressed one is not estimated (None). `max_documents` caps it."""
    total, exact = None, True
    try:
        if files is None:
            splits = getattr(dataset.info, "splits", None) or {}
            total = sum(split.num_examples for split in splits.values()) if len(splits) == 1 else None
        elif all(file_format(f) == "parquet" for f in files):
            import pyarrow.parquet as pq

            total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        elif not any(f.lower().endswith(COMPRESSION) for f in files):
            with open(files[0], "rb") as f:
                head = f.read(ESTIMATE_SAMPLE_BYTES)
            lines = head.count(b"\n") + (not head.endswith(b"\n"))
            sizes = sum(os.path.getsize(f) for f in files)
            total, exact = round(sizes / max(len(head), 1) * lines), len(head) >= sizes
    except (OSError, ValueError, AttributeError, TypeError):
        total = None
    if max_documents is not None and (total is None or total >= max_documents):
        return max_documents, total is not None
    return (total or None), exact


def _first_without_text(files: list[str] | None, d: DataConfig, column: str) -> str | None:
    """Where the first record without text is: `'corpus.jsonl' line 17` (a JSON line without the field or with
    null), or `'corpus.parquet' row 3`; None for a hub dataset."""
    for path in files or []:
        if file_format(path) == "json" and not path.lower().endswith(COMPRESSION):
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    record = json.loads(line) if line.strip() else {column: ""}
                    if not isinstance(record, dict) or record.get(column) is None:
                        return f"'{path}' line {number}"
            continue
        row = 0
        for batch in _open_files([path], d, streaming=True).select_columns([column]).iter(batch_size=READ_BATCH):
            for text in batch[column]:
                row += 1
                if text is None:
                    return f"'{path}' row {row}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def pack_split(documents: Dataset, tokenizer: PreTrainedTokenizerBase, d: DataConfig):
    """Tokenize and pack one split of documents in memory (map-style): its blocks and counts."""
    tokens = tokenize_corpus(documents, tokenizer, d)
    blocks, stats = pack_blocks(tokens, d.block_size, d.packing, d.cache_dir)
    stats["documents"] = len(documents)
    return blocks, stats


def summed_stats(per_source: dict[str, dict[str, Any]], mixed_blocks: int, draws: list[int],
                 sources: list[SourceConfig], mix: str) -> dict[str, Any]:
    """Counts of the train split; with several sources, also each source's weight, the blocks it supplies to an
    epoch of the mixture (`drawn`) and how many passes over its own blocks that is."""
    total = {key: sum(s[key] for s in per_source.values()) for key in ("documents", "tokens", "blocks", "remainder")}
    if len(per_source) > 1:
        weights = sum(s.weight for s in sources)
        for counts, drawn, source in zip(per_source.values(), draws, sources, strict=True):
            counts.update(weight=source.weight / weights, drawn=drawn, passes=drawn / counts["blocks"])
        total.update(blocks=mixed_blocks, mix=mix, sources=per_source)
    return total


# ----------------------------------------------------------------------------------------------------------
# Sources and mixing


def mix_blocks(blocks: list[Dataset], sources: list[SourceConfig], seed: int, mix: str = "primary",
               total: int | None = None) -> tuple[Dataset, list[int]]:
    """One epoch of the weighted mixture of per-source blocks, and how many blocks each source supplies to it.

    How many is `mixture_draws`'s: exact counts, not random ones. A source drawn more often than it has blocks
    is repeated pass after pass, each pass in a fresh seeded order; one drawn less gives a seeded random subset.
    Whole blocks are mixed (not documents), so the token shares follow the weights whatever the document
    lengths; the mixed blocks are shuffled together (the Trainer shuffles them again every epoch), so any window
    of the training stream holds the sources in the weights' proportions, up to sampling noise.
    """
    if len(blocks) == 1:
        return blocks[0], [len(blocks[0])]
    sizes = [len(b) for b in blocks]
    draws = mixture_draws(sizes, [s.weight for s in sources], mix, total)
    picks, offset = [], 0
    for i, (size, count) in enumerate(zip(sizes, draws, strict=True)):
        order = np.random.default_rng([seed, i])
        passes = [order.permutation(size) for _ in range(-(-count // size))]
        picks.append(np.concatenate(passes)[:count] + offset if passes else np.empty(0, dtype=np.int64))
        offset += size
    indices = np.random.default_rng([seed, len(sizes)]).permutation(np.concatenate(picks))
    tagged = concatenate_datasets([b.add_column("source", np.full(len(b), i, dtype=np.int32))
                                   for i, b in enumerate(blocks)])
    return tagged.select(indices), draws


def mixture_plan(train: dict[str, Any], blocks_trained: int) -> dict[str, dict[str, Any]]:
    """What a run that trains on `blocks_trained` blocks would take from each source of a map-style mixture
    (`stats["train"]`): its blocks, the blocks trained on, the passes that makes, and the share of its blocks
    seen at least once (an epoch draws the same subset of a source it does not use whole)."""
    plan = {}
    for name, source in (train.get("sources") or {}).items():
        used = blocks_trained * source["drawn"] / train["blocks"]
        seen = min(used, source["drawn"], source["blocks"]) / source["blocks"]
        plan[name] = {"blocks": source["blocks"], "used": round(used), "passes": used / source["blocks"],
                      "seen": seen}
    return plan


def report_mixture_weights(sources: list[SourceConfig]) -> None:
    """Say how `data.sources` weights that do not add up to 1 are read: as shares of the mixture (0.9 and 0.3 are
    0.75 and 0.25), rather than renormalising them silently."""
    total = sum(s.weight for s in sources)
    if len(sources) < 2 or abs(total - 1) < 1e-9:
        return
    logger.info("data.sources: the weights (%s) add up to %s, not 1: they are read as shares of the mixture, %s",
                ", ".join(f"{s.weight:g}" for s in sources), f"{total:g}",
                ", ".join(f"{source_name(s)} {s.weight / total:.3g}" for s in sources))


def report_mixture_plan(train: dict[str, Any], blocks_trained: int, max_steps: int | None = None,
                        warn: bool = True) -> None:
    """Log what the run takes from each source and, with `warn`, warn when a source would be mostly left out (less
    than 95% of its blocks seen) or repeated more than 4 times: both are usually not what the weights were meant
    to say. `max_steps`: the run's length when steps set it (the advice is then about steps, not weights).

    A run warns once, as it starts: a resumed run passes `warn=False`."""
    plan = mixture_plan(train, blocks_trained)
    if not plan:
        return
    logger.info("mixture (%s): %s", train.get("mix"), "; ".join(
        f"{name} (weight {train['sources'][name]['weight']:.3g}) {p['blocks']:,} blocks, {p['used']:,} used "
        f"({p['passes']:.2f} passes)" for name, p in plan.items()))
    if not warn:
        return
    for name, p in plan.items():
        if p["seen"] < 0.95:
            seen = max(1, round(p["seen"] * p["blocks"]))  # a share of a block is one block, at some step
            logger.warning("data.sources: '%s' would be trained on only %s of its %s blocks (%s): %s", name,
                           f"{seen:,}", f"{p['blocks']:,}", percent(seen / p["blocks"]),
                           underuse_advice(train, name, blocks_trained, max_steps))
        elif p["passes"] > 4:
            shorter = f", or lower training.max_steps ({max_steps:,})" if max_steps else ""
            logger.warning("data.sources: each block of '%s' would be trained on %.1f times (%s blocks, %s used); "
                           "lower its weight or give it more text%s", name, p["passes"], f"{p['blocks']:,}",
                           f"{p['used']:,}", shorter)


def underuse_advice(train: dict[str, Any], name: str, blocks_trained: int, max_steps: int | None) -> str:
    """Why a source of the mixture would be mostly left out, and what changes that: the run's length when it ends
    before an epoch of the mixture (`max_steps`: the steps it would take), its weight when an epoch draws only a
    subset of it (training longer repeats the same subset), or both."""
    source = train["sources"][name]
    drawn, blocks = source["drawn"], source["blocks"]
    used = blocks_trained * drawn / train["blocks"]
    subset = drawn < blocks
    reasons = []
    if used < min(drawn, blocks) * 0.95:
        what = f"the {drawn:,} an epoch of the mixture draws" if subset else "each of its blocks once"
        if max_steps:
            steps = math.ceil(min(drawn, blocks) * train["blocks"] / (drawn * blocks_trained / max_steps))
            reasons.append(f"training.max_steps ({max_steps:,}) ends the run first: about {steps:,} steps would see "
                           f"{what}")
        else:
            reasons.append(f"the run ends within its first epoch: one epoch (training.num_train_epochs: 1) would see "
                           f"{what}")
    if subset and train.get("mix") == "token_budget":
        reasons.append(f"data.token_budget gives it {drawn:,} blocks by its weight {source['weight']:.3g}; raise its "
                       "weight or the budget")
    elif subset:
        reasons.append(f"an epoch of the mixture (data.mix: {train.get('mix')}) draws {drawn:,} of them by its "
                       f"weight {source['weight']:.3g}; raise its weight, or set data.mix: all_exhausted to see every "
                       "block of every source")
    return "; ".join(reasons)


def percent(share: float) -> str:
    """A share as a percentage with three significant digits: 12.7%, 0.41% (never a bare 0% for a few blocks)."""
    return f"{100 * share:.3g}%"


def mixture_used(train: dict[str, Any], tokens_seen: dict[str, int], block_size: int) -> dict[str, dict[str, Any]]:
    """What training took from each source: blocks trained on (its tokens / block size) and, when the source's
    size is known (not streamed), its blocks and the passes over them."""
    sources = train.get("sources") if isinstance(train.get("sources"), dict) else {}
    used = {}
    for name, tokens in tokens_seen.items():
        blocks = sources.get(name, {}).get("blocks")
        used[name] = {"blocks": blocks, "used": tokens // block_size, "tokens": tokens,
                      "passes": tokens / block_size / blocks if blocks else None}
    return used


def mixture_draws(sizes: list[int], weights: list[float], mix: str, total: int | None = None) -> list[int]:
    """Blocks each source supplies to one epoch of the mixture, in the weights' proportions.

    `primary`: every block of the first source once, the others by weight. `all_exhausted`: the shortest epoch
    in which every source is seen whole. `first_exhausted`: the longest epoch in which no source repeats.
    `total` (from `data.token_budget`): that many blocks in all, whatever `mix` says.
    """
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    n = np.asarray(sizes, dtype=np.float64)
    if total is not None:
        draws = np.rint(total * p)
    elif mix == "primary":
        draws = np.rint(n[0] / p[0] * p)
        draws[0] = n[0]
    elif mix == "all_exhausted":
        draws = np.maximum(n, np.rint((n / p).max() * p))
    else:
        draws = np.minimum(n, np.rint((n / p).min() * p))
    return [int(k) for k in draws]


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_corpus(d: DataConfig, source: SourceConfig | None = None, streaming: bool | None = None):
    """The raw corpus as a Dataset (an IterableDataset when streaming) with one `text` column.

    `source` defaults to `data.path`; it may be a hub id, local files, globs or directories.
    """
    source = source or data_sources(d)[0]
    streaming = d.streaming if streaming is None else streaming
    files = resolve_local_files(source.path, "data.path")
    if files is None:
        dataset = _load_hub(source, d, streaming)
        where = source.path
    else:
        dataset = _load_files(files, d, streaming)
        where = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} files)"
    column = source.text_column or d.text_column
    _check_column(dataset, column, where)
    if not streaming and not _is_text(dataset.features[column]):
        _raise_not_text(d, source)
    dataset = dataset.select_columns([column])
    if column != "text":
        dataset = dataset.rename_column(column, "text")
    limit = document_limit(d, source)
    if limit is not None:
        dataset = dataset.take(limit) if streaming else dataset.select(range(min(limit, len(dataset))))
    return dataset


def _check_column(dataset, column: str, where: str) -> None:
    columns = column_names(dataset)
    if column not in columns:
        raise IgeaError(
            f"data.text_column: column '{column}' is not in '{where}'; its columns are: {', '.join(columns)}"
        )


def _is_text(feature: Any) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null")


def column_names(dataset) -> list[str]:
    """A dataset's columns; a stream that does not declare them shows its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset.take(1)), None)
    return list(first) if first else []


def _load_hub(source: SourceConfig, d: DataConfig, streaming: bool):
    dataset_id = source.path
    if not hub_reachable() and not datasets_offline():
        raise IgeaError(
            f"cannot load dataset '{dataset_id}': it is not a local file and the Hugging Face hub is unreachable "
            "(set HF_HUB_OFFLINE=1 to use a cached copy)"
        )
    try:
        return load_dataset(dataset_id, source.name, split=source.split, revision=d.revision, cache_dir=d.cache_dir,
                            streaming=streaming)
    except (ConnectionError, OSError) as err:
        raise IgeaError(
            f"cannot load dataset '{dataset_id}': it is not a local file and the Hugging Face hub did not answer "
            "(offline, wrong id, or a gated dataset without a token)"
        ) from err
    except ValueError as err:
        raise IgeaError(f"cannot load dataset '{dataset_id}': {str(err).splitlines()[0]}") from err


def datasets_offline() -> bool:
    """True when datasets was told to use only its local cache (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def file_format(path: str) -> str:
    """The `datasets` builder for a file, from its suffix (compression suffixes are looked through)."""
    name = path.lower()
    for suffix in COMPRESSION:
        name = name.removesuffix(suffix)
    builder = BUILDERS.get(Path(name).suffix)
    if builder is None:
        raise IgeaError(f"data.path: '{path}' is not a .txt, .jsonl, .json, .parquet or .csv file")
    return builder


def _load_files(files: list[str], d: DataConfig, streaming: bool = False):
    dataset = _open_files(files, d, streaming)
    if file_format(files[0]) == "text":
        dataset = dataset.map(_strip_pmid, batched=True, **({} if streaming else {"desc": "Reading lines"}))
    return dataset


def _open_files(files: list[str], d: DataConfig, streaming: bool):
    """`datasets`' reader for the files' format (all of one format), as a Dataset or a stream."""
    builders = {file_format(f) for f in files}
    if len(builders) > 1:
        raise IgeaError(f"data.path: files of different formats ({', '.join(sorted(builders))}); use data.sources")
    builder = builders.pop()
    kwargs: dict[str, Any] = {}
    if builder in ("text", "json", "csv"):
        kwargs["encoding_errors"] = d.encoding_errors
    try:
        return load_dataset(builder, data_files=files, split="train", cache_dir=d.cache_dir, streaming=streaming,
                            **kwargs)
    except Exception as err:  # datasets wraps reader errors in DatasetGenerationError
        raise explain_read_error(err, files, files[0]) from err


def _strip_pmid(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    """`PMID|text` lines (the form translated PubMed dumps use) keep only their text."""
    return {"text": [PMID_PREFIX.sub("", line, count=1) for line in batch["text"]]}


def read_documents(d: DataConfig, limit: int | None = None) -> list[str]:
    """The first `limit` cleaned documents of the corpus as plain strings (to train a tokenizer on)."""
    texts: list[str] = []
    for batch in document_batches(d, data_sources(d)[0], report=False):
        texts.extend(batch)
        if limit is not None and len(texts) >= limit:
            return texts[:limit]
    return texts


# ----------------------------------------------------------------------------------------------------------
# Read errors: one line naming the file (and the line or row when it can be found)


class NotTextError(IgeaError):
    """A document's text is not a string (e.g. `{"text": 42}`)."""


@contextmanager
def explained_errors(d: DataConfig, source: SourceConfig):
    """Turn a failure to read `source` into one IgeaError naming the file (and line or row when found)."""
    try:
        yield
    except NotTextError:
        _raise_not_text(d, source)
        raise
    except IgeaError:
        raise
    except Exception as err:
        files = resolve_local_files(source.path, "data.path")
        raise explain_read_error(err, files, files[0] if files else str(source.path)) from err


def _check_texts(texts: list) -> None:
    for text in texts:
        if text is not None and not isinstance(text, str):
            raise NotTextError(f"data.text_column: a document is {_short(text)} ({type(text).__name__}), not text")


def _raise_not_text(d: DataConfig, source: SourceConfig) -> None:
    """Read `source` file by file up to its first value that is not text, and name that file and row."""
    column = source.text_column or d.text_column
    files = resolve_local_files(source.path, "data.path")
    for where in files or [str(source.path)]:
        dataset = _open_files([where], d, streaming=True) if files else _load_hub(source, d, streaming=True)
        row = 0
        for batch in dataset.select_columns([column]).iter(batch_size=READ_BATCH):
            for text in batch[column]:
                row += 1
                if text is not None and not isinstance(text, str):
                    raise IgeaError(f"data.text_column: '{where}' row {row}: column '{column}' holds {_short(text)} "
                                    f"({type(text).__name__}), not text")


def explain_read_error(err: BaseException, files: list[str] | None, where: str) -> IgeaError:
    """The one-line error for a corpus that cannot be read: bad UTF-8 or bad JSON located in its file."""
    causes = []
    cause: BaseException | None = err
    while cause is not None and len(causes) < 20:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, UnicodeDecodeError) for c in causes):
        bad, line = next(((f, n) for f in files or [] if (n := _first_bad_utf8_line(f))), (where, None))
        at = f" (line {line})" if line else ""
        return IgeaError(
            f"data.path: '{bad}' is not valid UTF-8{at}; fix the file or set data.encoding_errors: replace "
            "(bad bytes become U+FFFD) or ignore (they are dropped)"
        )
    if any("json" in str(c).lower() for c in causes):
        for f in files or []:
            if file_format(f) == "json" and (bad := _first_bad_json_line(f)):
                return IgeaError(f"data.path: '{f}' line {bad[0]} is not valid JSON: {bad[1]}")
    reason = next((str(c) for c in reversed(causes) if str(c).strip()), type(err).__name__)
    return IgeaError(f"cannot read corpus '{where}': {reason.strip().splitlines()[0][:300]}")


def _first_bad_utf8_line(path: str) -> int | None:
    """The first line of a plain file that is not UTF-8 (lines can be decoded alone: \\n is never inside a
    UTF-8 sequence); None when there is none or the file is compressed."""
    if path.lower().endswith(COMPRESSION) or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def _first_bad_json_line(path: str) -> tuple[int, str] | None:
    """(line number, reason) of the first line of a plain JSON-lines file that is not a JSON object."""
    if path.lower().endswith(COMPRESSION) or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return number, f"{err.msg.removesuffix(' at')} at column {err.colno}"
            except ValueError as err:  # bytes that are not text
                return number, str(err).splitlines()[0]
            if not isinstance(value, dict):
                return number, f"expected an object, got {_short(value)}"
    return None


# ----------------------------------------------------------------------------------------------------------
# Cleaning and splitting


def clean_corpus(dataset, d: DataConfig):
    """Strip whitespace and drop empty or too short documents (`data.min_chars`), reporting the counts.

    A streamed corpus is cleaned on the fly as it is read (and cannot be counted up front).
    """
    min_chars = max(d.min_chars, 1)

    def long_enough(batch: dict[str, list[str]]) -> list[bool]:
        return [len(t) >= min_chars for t in batch["text"]]

    if isinstance(dataset, IterableDataset):
        return dataset.map(_strip_texts, batched=True).filter(long_enough, batched=True)
    before = len(dataset)
    dataset = dataset.map(_strip_texts, batched=True, desc="Cleaning")
    dataset = dataset.filter(long_enough, batched=True, desc="Dropping short documents")
    logger.info("kept %d of %d documents (%d dropped: empty or shorter than %d characters)",
                len(dataset), before, before - len(dataset), min_chars)
    if len(dataset) == 0:
        raise IgeaError(f"data: the corpus has no documents of at least {min_chars} characters ({before} read)")
    return dataset


def _strip_texts(batch: dict[str, list]) -> dict[str, list[str]]:
    _check_texts(batch["text"])
    return {"text": [(t or "").strip() for t in batch["text"]]}


def split_corpus(corpus: IterableDataset, validation_split: int, seed: int) -> dict[str, Any]:
    """A streamed corpus's first `validation_split` documents (a count) for validation, in memory.

    (A map-style corpus is split at random by documents where it is prepared: `blockstore.HeldOut`.)
    """
    if not validation_split:
        return {"train": corpus}
    held_out = Dataset.from_list(list(corpus.take(validation_split)))
    if len(held_out) == 0:
        raise IgeaError("data: the streamed corpus has no documents")
    return {"train": corpus.skip(validation_split), "validation": held_out}


# ----------------------------------------------------------------------------------------------------------
# Tokenizing and packing


def tokenize_corpus(documents, tokenizer: PreTrainedTokenizerBase, d: DataConfig):
    """Token ids of each document with its boundaries, as `blockstore.document_ids` makes them (a Dataset, or an
    IterableDataset when streaming): the tokenizer's own special tokens, and with `eos` an EOS after each.
    """

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"input_ids": document_ids(tokenizer, batch["text"], d.document_boundary)}

    features = Features({"input_ids": List(Value("int32"))})
    if isinstance(documents, IterableDataset):
        return documents.map(tokenize, batched=True, remove_columns=["text"], features=features)
    return documents.map(tokenize, batched=True, num_proc=d.num_proc, remove_columns=documents.column_names,
                         features=features, desc="Tokenizing")


def block_features(packing: str) -> Features:
    features = {"input_ids": List(Value("int32"))}
    if packing == "documents":
        features["position_ids"] = List(Value("int32"))
    return Features(features)


def pack_blocks(
    tokens: Dataset, block_size: int, packing: str = "blocks", cache_dir: str | None = None
) -> tuple[Dataset, dict[str, int]]:
    """Concatenate all documents' tokens in order and cut them into `block_size` blocks (no padding).

    With `packing="documents"` each block also gets `position_ids` that restart at 0 at every document
    start (and at the block start), so attention and positions never cross documents. The tail shorter
    than a block is dropped and reported as `remainder`.
    """
    total = int(pc.sum(pc.list_value_length(tokens.data.column("input_ids"))).as_py() or 0)
    features = block_features(packing)
    if total < block_size:
        empty = Dataset.from_dict({name: [] for name in features}, features=features)
        return empty, {"tokens": total, "blocks": 0, "remainder": total}
    key = f"{tokens._fingerprint}-{block_size}-{packing}"
    blocks = Dataset.from_generator(
        _generate_blocks,
        features=features,
        gen_kwargs={"tokens": tokens, "block_size": block_size, "with_positions": packing == "documents"},
        cache_dir=cache_dir,
        fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
    )
    stats = {"tokens": total, "blocks": len(blocks), "remainder": total - len(blocks) * block_size}
    return blocks, stats


def _generate_blocks(tokens: Dataset, block_size: int, with_positions: bool):
    """Blocks of a tokenized Dataset, read in Arrow batches."""
    batches = tokens.with_format("arrow").iter(batch_size=10_000)
    arrays = ((pc.list_value_length(b.column("input_ids")).to_numpy(zero_copy_only=False),
               pc.list_flatten(b.column("input_ids")).to_numpy(zero_copy_only=False)) for b in batches)
    yield from _cut_blocks(arrays, block_size, with_positions)


def _cut_blocks(batches, block_size: int, with_positions: bool):
    """Yield blocks from (document lengths, token ids) batches, carrying the unfinished block across batches."""
    carry_ids = np.empty(0, dtype=np.int32)
    carry_starts = np.empty(0, dtype=np.int64)  # global index of the document start of each carried token
    offset = 0  # global index of the first carried token
    for lengths, ids in batches:
        base = offset + len(carry_ids)
        doc_starts = base + np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        carry_ids = np.concatenate((carry_ids, ids.astype(np.int32, copy=False)))
        if with_positions:
            carry_starts = np.concatenate((carry_starts, np.repeat(doc_starts, lengths)))
        full = len(carry_ids) // block_size
        for b in range(full):
            row = slice(b * block_size, (b + 1) * block_size)
            example = {"input_ids": carry_ids[row].tolist()}  # datasets writes lists ~2x faster than arrays
            if with_positions:
                block_start = offset + b * block_size
                index = np.arange(block_start, block_start + block_size)
                example["position_ids"] = (index - np.maximum(carry_starts[row], block_start)).tolist()
            yield example
        used = full * block_size
        carry_ids = carry_ids[used:]
        if with_positions:
            carry_starts = carry_starts[used:]
        offset += used


# ----------------------------------------------------------------------------------------------------------
# Batches


class BlockCollator:
    """Stack equal-length blocks into a batch; labels are the inputs (the model shifts them).

    Blocks packed by document carry `position_ids`; the first token of each document is then not a target,
    so no token is predicted from another document.
    """

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
        batch = {"input_ids": input_ids, "labels": input_ids.clone()}
        if "position_ids" in examples[0]:
            position_ids = torch.tensor([e["position_ids"] for e in examples], dtype=torch.long)
            batch["position_ids"] = position_ids
            batch["labels"][position_ids == 0] = IGNORE_INDEX
        if "source" in examples[0]:  # mixed corpora: which source each block came from (counted, not modelled)
            batch["source"] = torch.tensor([e["source"] for e in examples], dtype=torch.long)
        return batch
