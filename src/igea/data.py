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
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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
    interleave_datasets,
    load_dataset,
)
from transformers import PreTrainedTokenizerBase

from igea.blockstore import (
    DocumentEncoder,
    HeldOut,
    PreparedBlocks,
    build_blocks,
    cache_key,
    open_or_build,
    tokenizer_fingerprint,
)
from igea.config import DataConfig, IgeaConfig, SourceConfig, looks_local, resolve_local_files
from igea.errors import IgeaError
from igea.hub import hub_reachable
from igea.metrics import IGNORE_INDEX
from igea.streaming import BlockStream

logger = logging.getLogger(__name__)

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
PMID_PREFIX = re.compile(r"^\s*\d+\s*\|")
READ_BATCH = 1000  # documents read, cleaned and tokenized together


@dataclass
class PreparedData:
    """Packed train and validation blocks, with the counts that show nothing was lost on the way.

    `stats["cache"]` says whether this process tokenized the corpus ("built") or opened blocks prepared
    before ("loaded"); `stats["prepared"]` says where they are.
    """

    train: Dataset | IterableDataset
    validation: Dataset | None
    stats: dict[str, Any] = field(default_factory=dict)


def prepare_dataset(cfg: IgeaConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Load, clean, split, tokenize and pack the corpus (or the weighted corpora) the `data:` section names.

    The blocks are prepared once on disk and memory-mapped (`prepare_corpus`). With `data.streaming` the train
    split is an iterable read, tokenized and packed on the fly; its validation split is a small in-memory set
    of blocks.
    """
    d = cfg.data
    seed = d.seed if d.seed is not None else cfg.training.get("seed", 42)
    if not d.streaming:
        return prepare_blocks(d, tokenizer, seed)
    sources = data_sources(d)
    train_parts, validation_parts = [], []
    for source in sources:
        with explained_errors(d, source):
            split = split_corpus(clean_corpus(load_corpus(d, source), d), d.validation_split, seed)
        train_parts.append(split["train"])
        validation_parts.extend([split["validation"]] if "validation" in split else [])
    if d.validation_path is not None:
        validation_source = SourceConfig(path=d.validation_path, text_column=d.text_column, name=d.name, split=d.split)
        validation_parts = [clean_corpus(load_corpus(d, validation_source, streaming=False), d)]

    stats: dict[str, Any] = {}
    validation = None
    if validation_parts:
        documents = validation_parts[0] if len(validation_parts) == 1 else concatenate_datasets(validation_parts)
        validation, stats["validation"] = pack_split("validation", documents, tokenizer, d)
    train = BlockStream(train_parts, [source_label(s) for s in sources], [s.weight for s in sources], tokenizer, d,
                        seed, explain=lambda index: explained_errors(d, sources[index]))
    stats["train"] = {"streaming": True, "sources": [source_label(s) for s in sources]}
    return PreparedData(train, validation, stats)


# ----------------------------------------------------------------------------------------------------------
# Preparation on disk


def prepare_blocks(d: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Train and validation blocks of a map-style corpus, each source prepared once and memory-mapped."""
    sources = data_sources(d)
    held_out = HeldOut(0 if d.validation_path is not None else d.validation_split, seed)
    corpora = [prepare_corpus(d, source, tokenizer, held_out) for source in sources]
    blocks, per_source = [], {}
    for corpus, source in zip(corpora, sources, strict=True):
        label = source_label(source)
        per_source[label] = checked_counts(f"train ({label})" if len(sources) > 1 else "train",
                                           corpus.manifest["kept"], d)
        blocks.append(corpus.kept)
    if d.validation_path is not None:
        source = SourceConfig(path=d.validation_path, text_column=d.text_column, name=d.name, split=d.split)
        corpora.append(prepare_corpus(d, source, tokenizer, HeldOut(0, seed)))
        held = [(corpora[-1].kept, corpora[-1].manifest["kept"])]
    else:
        held = [(c.held_out, c.manifest["held_out"]) for c in corpora if c.held_out is not None]
    stats: dict[str, Any] = {}
    validation = None
    if held:
        validation = held[0][0] if len(held) == 1 else concatenate_datasets([h[0] for h in held])
        counts = {key: sum(h[1][key] for h in held) for key in ("documents", "tokens", "blocks", "remainder")}
        stats["validation"] = checked_counts("validation", counts, d)
    train = mix_blocks(blocks, sources, seed)
    stats["train"] = summed_stats(per_source, len(train))
    stats["cache"] = "built" if any(c.cache == "built" for c in corpora) else "loaded"
    stats["prepared"] = {"dirs": [str(c.path) for c in corpora], "token_dtype": corpora[0].manifest["token_dtype"]}
    return PreparedData(train, validation, stats)


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
        "max_documents": d.max_documents,
        "min_chars": d.min_chars,
        "encoding_errors": d.encoding_errors,
        "document_boundary": d.document_boundary,
        "block_size": d.block_size,
        "packing": d.packing,
        "held_out": {"split": held_out.split, "seed": held_out.seed} if held_out.split else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }

    def build(directory: Path) -> dict[str, Any]:
        encoder = DocumentEncoder(tokenizer, d.document_boundary)
        batches = document_batches(d, source)
        first = next(batches)
        encoder.check(first[:16])
        return build_blocks(chain([first], batches), encoder, directory, block_size=d.block_size,
                            packing=d.packing, held_out=held_out, num_proc=d.num_proc or 1)

    prepared = open_or_build(prepared_root(d), cache_key(settings), settings, build)
    logger.info("%s: %s blocks in %s", source_label(source), prepared.cache, prepared.path)
    return prepared


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


def checked_counts(name: str, counts: dict[str, int], d: DataConfig) -> dict[str, int]:
    """A split's counts, refusing a split too short for a single block."""
    logger.info("%s: %d documents, %d tokens -> %d blocks of %d (%d tokens left over at the end)",
                name, counts["documents"], counts["tokens"], counts["blocks"], d.block_size, counts["remainder"])
    if counts["blocks"] == 0:
        raise IgeaError(
            f"data: the {name} split has {counts['tokens']} tokens, fewer than one block of "
            f"data.block_size={d.block_size}; lower the block size or give it more text"
        )
    return dict(counts)


def document_batches(d: DataConfig, source: SourceConfig, batch_size: int = READ_BATCH) -> Iterator[list[str]]:
    """The cleaned texts of one source, in order, `batch_size` documents at a time.

    The files are read as a stream: nothing is loaded whole or copied into a cache. Cleaning is
    `clean_corpus`'s: whitespace stripped, documents shorter than `data.min_chars` dropped.
    """
    column = source.text_column or d.text_column
    min_chars = max(d.min_chars, 1)
    files = resolve_local_files(source.path, "data.path")
    strip_pmid = files is not None and file_format(files[0]) == "text"
    read = kept = 0
    with explained_errors(d, source):
        dataset = _open_files(files, d, streaming=True) if files else _load_hub(source, d, streaming=True)
        _check_column(dataset, column, files[0] if files else str(source.path))
        for batch in dataset.select_columns([column]).iter(batch_size=batch_size):
            texts = batch[column]
            if d.max_documents is not None:
                texts = texts[: d.max_documents - read]
            _check_texts(texts)
            read += len(texts)
            if strip_pmid:
                texts = [PMID_PREFIX.sub("", t, count=1) for t in texts]
            texts = [s for s in ((t or "").strip() for t in texts) if len(s) >= min_chars]
            kept += len(texts)
            if texts:
                yield texts
            if d.max_documents is not None and read >= d.max_documents:
                break
    logger.info("kept %d of %d documents (%d dropped: empty or shorter than %d characters)",
                kept, read, read - kept, min_chars)
    if kept == 0:
        raise IgeaError(f"data: the corpus has no documents of at least {min_chars} characters ({read} read)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def pack_split(name: str, documents: Dataset, tokenizer: PreTrainedTokenizerBase, d: DataConfig):
    """Tokenize and pack one split (map-style), refusing a split too short for a single block."""
    tokens = tokenize_corpus(documents, tokenizer, d)
    blocks, stats = pack_blocks(tokens, d.block_size, d.packing, d.cache_dir)
    stats["documents"] = len(documents)
    return blocks, checked_counts(name, stats, d)


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
    tagged = [b.add_column("source", np.full(len(b), i, dtype=np.int32)) if isinstance(b, Dataset)
              else b.map(_tag_source(i), batched=True) for i, b in enumerate(blocks)]
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
    _check_column(dataset, column, where)
    if not streaming and not _is_text(dataset.features[column]):
        _raise_not_text(d, source)
    dataset = dataset.select_columns([column])
    if column != "text":
        dataset = dataset.rename_column(column, "text")
    if d.max_documents is not None:
        dataset = dataset.take(d.max_documents) if streaming else dataset.select(
            range(min(d.max_documents, len(dataset))))
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
    for batch in document_batches(d, data_sources(d)[0]):
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
