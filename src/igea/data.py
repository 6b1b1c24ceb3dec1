"""Corpus -> clean documents -> token ids -> fixed-length blocks, on top of `datasets`.

The steps, each a small function: `load_corpus` (hub id or local txt/jsonl/parquet/csv), `clean_corpus`,
`split_corpus`, `tokenize_corpus` (a document boundary after every document) and `pack_blocks`
(every token kept, in order, in `block_size` blocks with no padding). `prepare_dataset` runs them all.
Each step is a `datasets` operation, so results are cached on disk and keyed by their inputs.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import (
    Dataset,
    Features,
    IterableDataset,
    List,
    Value,
    concatenate_datasets,
    interleave_datasets,
    load_dataset,
)
from transformers import PreTrainedTokenizerBase

from igea.config import DataConfig, IgeaConfig, SourceConfig, looks_local, resolve_local_files
from igea.errors import IgeaError
from igea.hub import hub_reachable
from igea.streaming import BlockStream

logger = logging.getLogger(__name__)

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
PMID_PREFIX = re.compile(r"^\s*\d+\s*\|")


@dataclass
class PreparedData:
    """Packed train and validation blocks, with the counts that show nothing was lost on the way."""

    train: Dataset
    validation: Dataset | None
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)


def prepare_dataset(cfg: IgeaConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> PreparedData:
    """Load, clean, split, tokenize and pack the corpus (or the weighted corpora) the `data:` section names.

    With `data.streaming` the train split is an iterable read, tokenized and packed on the fly; the
    validation split is always a small in-memory set of blocks.
    """
    if tokenizer is None:
        from igea.modeling import load_tokenizer  # the tokenizer may first need the tiny model built

        tokenizer = load_tokenizer(cfg)
    d = cfg.data
    seed = d.seed if d.seed is not None else cfg.training.get("seed", 42)
    sources = data_sources(d)
    train_parts, validation_parts = [], []
    for source in sources:
        documents = clean_corpus(load_corpus(d, source), d)
        if d.validation_path is not None:
            train_parts.append(documents)
        else:
            split = split_corpus(documents, d.validation_split, seed)
            train_parts.append(split["train"])
            validation_parts.extend([split["validation"]] if "validation" in split else [])
    if d.validation_path is not None:
        validation_source = SourceConfig(path=d.validation_path, text_column=d.text_column, name=d.name, split=d.split)
        validation_parts = [clean_corpus(load_corpus(d, validation_source, streaming=False), d)]

    stats: dict[str, dict[str, Any]] = {}
    validation = None
    if validation_parts:
        documents = validation_parts[0] if len(validation_parts) == 1 else concatenate_datasets(validation_parts)
        validation, stats["validation"] = pack_split("validation", documents, tokenizer, d)
    if d.streaming:
        train = BlockStream(train_parts, [source_label(s) for s in sources], [s.weight for s in sources],
                            tokenizer, d, seed)
        stats["train"] = {"streaming": True, "sources": [source_label(s) for s in sources]}
    else:
        blocks, per_source = [], {}
        for documents, source in zip(train_parts, sources, strict=True):
            label = source_label(source)
            packed, per_source[label] = pack_split(f"train ({label})" if len(sources) > 1 else "train",
                                                   documents, tokenizer, d)
            blocks.append(packed)
        train = mix_blocks(blocks, sources, seed)
        stats["train"] = summed_stats(per_source, len(train))
    return PreparedData(train, validation, stats)


def pack_split(name: str, documents: Dataset, tokenizer: PreTrainedTokenizerBase, d: DataConfig):
    """Tokenize and pack one split (map-style), refusing a split too short for a single block."""
    tokens = tokenize_corpus(documents, tokenizer, d)
    blocks, stats = pack_blocks(tokens, d.block_size, d.packing, d.cache_dir)
    stats["documents"] = len(documents)
    logger.info("%s: %d documents, %d tokens -> %d blocks of %d (%d tokens left over at the end)",
                name, len(documents), stats["tokens"], stats["blocks"], d.block_size, stats["remainder"])
    if stats["blocks"] == 0:
        raise IgeaError(
            f"data: the {name} split has {stats['tokens']} tokens, fewer than one block of "
            f"data.block_size={d.block_size}; lower the block size or give it more text"
        )
    return blocks, stats


def summed_stats(per_source: dict[str, dict[str, int]], mixed_blocks: int) -> dict[str, Any]:
    """Counts of the train split; with several sources, also each source's share of the mixed blocks."""
    total = {key: sum(s[key] for s in per_source.values()) for key in ("documents", "tokens", "blocks", "remainder")}
    if len(per_source) > 1:
        total["blocks"] = mixed_blocks
        total["sources"] = per_source
    return total


# ----------------------------------------------------------------------------------------------------------
# Sources and mixing


def data_sources(d: DataConfig) -> list[SourceConfig]:
    """The corpora to read: `data.sources`, or the single `data.path` as one source of weight 1."""
    if d.sources:
        return [replace(s, text_column=s.text_column or d.text_column) for s in d.sources]
    return [SourceConfig(path=d.path, weight=1.0, text_column=d.text_column, name=d.name, split=d.split)]


def source_label(source: SourceConfig) -> str:
    """A short readable name for a source: its hub id or its first file's name."""
    path = source.path if isinstance(source.path, str) else source.path[0]
    label = path if not looks_local(path) else Path(path).name
    return f"{label}:{source.name}" if source.name else label


def mix_blocks(blocks: list, sources: list[SourceConfig], seed: int):
    """Interleave per-source blocks so each source supplies a `weight` share of the tokens (seeded).

    Mixing whole blocks (not documents) makes the token shares follow the weights whatever the document
    lengths. The mixture ends when the first source runs out, so no source is repeated.
    """
    if len(blocks) == 1:
        return blocks[0]
    tagged = [b.map(_tag_source(i), batched=True) for i, b in enumerate(blocks)]
    total = sum(s.weight for s in sources)
    return interleave_datasets(tagged, probabilities=[s.weight / total for s in sources], seed=seed,
                               stopping_strategy="first_exhausted")


def _tag_source(index: int):
    def tag(batch: dict[str, list]) -> dict[str, list[int]]:
        return {"source": [index] * len(batch["input_ids"])}

    return tag


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
    columns = column_names(dataset)
    if column not in columns:
        raise IgeaError(
            f"data.text_column: column '{column}' is not in '{where}'; its columns are: {', '.join(columns)}"
        )
    dataset = dataset.select_columns([column])
    if column != "text":
        dataset = dataset.rename_column(column, "text")
    if d.max_documents is not None:
        dataset = dataset.take(d.max_documents) if streaming else dataset.select(
            range(min(d.max_documents, len(dataset))))
    return dataset


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
    builders = {file_format(f) for f in files}
    if len(builders) > 1:
        raise IgeaError(f"data.path: files of different formats ({', '.join(sorted(builders))}); use data.sources")
    builder = builders.pop()
    kwargs: dict[str, Any] = {}
    if builder in ("text", "json", "csv"):
        kwargs["encoding_errors"] = d.encoding_errors
    try:
        dataset = load_dataset(builder, data_files=files, split="train", cache_dir=d.cache_dir, streaming=streaming,
                               **kwargs)
    except Exception as err:  # datasets wraps reader errors in DatasetGenerationError
        raise _explain_load_error(err, files) from err
    if builder == "text":
        dataset = dataset.map(_strip_pmid, batched=True, **({} if streaming else {"desc": "Reading lines"}))
    return dataset


def _strip_pmid(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    """`PMID|text` lines (the form translated PubMed dumps use) keep only their text."""
    return {"text": [PMID_PREFIX.sub("", line, count=1) for line in batch["text"]]}


def _explain_load_error(err: Exception, files: list[str]) -> IgeaError:
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        bad = next((f for f in files if not _is_utf8(f)), files[0])
        return IgeaError(
            f"data.path: '{bad}' is not valid UTF-8; fix the file or set data.encoding_errors: replace "
            "(bad bytes become U+FFFD) or ignore (they are dropped)"
        )
    return IgeaError(f"cannot read corpus {files[0]}: {str(err).splitlines()[0]}")


def _is_utf8(path: str) -> bool:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def read_documents(d: DataConfig, limit: int | None = None) -> list[str]:
    """The first `limit` cleaned documents of the corpus as plain strings (to train a tokenizer on)."""
    corpus = clean_corpus(load_corpus(d, streaming=False), d)
    if limit is not None:
        corpus = corpus.select(range(min(limit, len(corpus))))
    return list(corpus["text"])


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
    return {"text": [(t or "").strip() for t in batch["text"]]}


def split_corpus(corpus, validation_split: float | int, seed: int) -> dict[str, Any]:
    """A seeded random train/validation split: a fraction (0.05) or a count of documents (500).

    A streamed corpus gives its first `validation_split` documents (a count) to validation, in memory.
    """
    if isinstance(corpus, IterableDataset):
        if not validation_split:
            return {"train": corpus}
        held_out = Dataset.from_list(list(corpus.take(validation_split)))
        if len(held_out) == 0:
            raise IgeaError("data: the streamed corpus has no documents")
        return {"train": corpus.skip(validation_split), "validation": held_out}
    n = len(corpus)
    count = round(n * validation_split) if isinstance(validation_split, float) else validation_split
    if validation_split and count == 0:
        count = 1
    if count == 0:
        return {"train": corpus}
    if count >= n:
        raise IgeaError(f"data.validation_split: {validation_split!r} leaves no training documents (corpus has {n})")
    parts = corpus.train_test_split(test_size=count, seed=seed, shuffle=True)
    return {"train": parts["train"], "validation": parts["test"]}


# ----------------------------------------------------------------------------------------------------------
# Tokenizing and packing


def tokenize_corpus(documents, tokenizer: PreTrainedTokenizerBase, d: DataConfig):
    """Token ids of each document, with a boundary after it (a Dataset, or an IterableDataset when streaming).

    `eos` appends the tokenizer's EOS to every document; `special_tokens` lets the tokenizer add its own
    special tokens (what transformers' run_clm.py does, and how the Igea card's models were trained).
    """
    add_eos = d.document_boundary == "eos"
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=not add_eos, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids] if add_eos else ids}

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
