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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset
from transformers import PreTrainedTokenizerBase

from igea.config import DataConfig, IgeaConfig, resolve_local_files
from igea.errors import IgeaError
from igea.hub import hub_reachable

logger = logging.getLogger(__name__)

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
PMID_PREFIX = re.compile(r"^\s*\d+\s*\|")


@dataclass
class PreparedData:
    """Packed train and validation blocks, with the counts that show nothing was lost on the way."""

    train: Dataset
    validation: Dataset | None
    stats: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dataset_dict(self) -> DatasetDict:
        splits = {"train": self.train}
        if self.validation is not None:
            splits["validation"] = self.validation
        return DatasetDict(splits)


def prepare_dataset(cfg: IgeaConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> PreparedData:
    """Load, clean, split, tokenize and pack the corpus the `data:` section names."""
    if tokenizer is None:
        from igea.modeling import load_tokenizer  # the tokenizer may first need the tiny model built

        tokenizer = load_tokenizer(cfg)
    d = cfg.data
    seed = d.seed if d.seed is not None else cfg.training.get("seed", 42)
    corpus = clean_corpus(load_corpus(d), d)
    if d.validation_path is not None:
        splits = {"train": corpus, "validation": clean_corpus(load_corpus(d, d.validation_path), d)}
    else:
        splits = split_corpus(corpus, d.validation_split, seed)
    packed, stats = {}, {}
    for name, documents in splits.items():
        tokens = tokenize_corpus(documents, tokenizer, d)
        packed[name], stats[name] = pack_blocks(tokens, d.block_size, d.packing, d.cache_dir)
        stats[name]["documents"] = len(documents)
        logger.info(
            "%s: %d documents, %d tokens -> %d blocks of %d (%d tokens left over at the end)",
            name, len(documents), stats[name]["tokens"], stats[name]["blocks"], d.block_size, stats[name]["remainder"],
        )
        if stats[name]["blocks"] == 0:
            raise IgeaError(
                f"data: the {name} split has {stats[name]['tokens']} tokens, fewer than one block of "
                f"data.block_size={d.block_size}; lower the block size or give it more text"
            )
    return PreparedData(packed["train"], packed.get("validation"), stats)


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_corpus(d: DataConfig, paths: str | list[str] | None = None) -> Dataset:
    """The raw corpus as a Dataset with one `text` column (hub id, local files, globs or directories)."""
    paths = d.path if paths is None else paths
    files = resolve_local_files(paths, "data.path")
    if files is None:
        dataset = _load_hub(paths, d)
        source = paths
    else:
        dataset = _load_files(files, d)
        source = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} files)"
    if d.text_column not in dataset.column_names:
        raise IgeaError(
            f"data.text_column: column '{d.text_column}' is not in '{source}'; its columns are: "
            f"{', '.join(dataset.column_names)}"
        )
    dataset = dataset.select_columns([d.text_column])
    if d.text_column != "text":
        dataset = dataset.rename_column(d.text_column, "text")
    if d.max_documents is not None:
        dataset = dataset.select(range(min(d.max_documents, len(dataset))))
    return dataset


def _load_hub(dataset_id: str, d: DataConfig) -> Dataset:
    if not hub_reachable() and not datasets_offline():
        raise IgeaError(
            f"cannot load dataset '{dataset_id}': it is not a local file and the Hugging Face hub is unreachable "
            "(set HF_HUB_OFFLINE=1 to use a cached copy)"
        )
    try:
        return load_dataset(dataset_id, d.name, split=d.split, revision=d.revision, cache_dir=d.cache_dir)
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


def _load_files(files: list[str], d: DataConfig) -> Dataset:
    builders = {file_format(f) for f in files}
    if len(builders) > 1:
        raise IgeaError(f"data.path: files of different formats ({', '.join(sorted(builders))}); use data.sources")
    builder = builders.pop()
    kwargs: dict[str, Any] = {}
    if builder in ("text", "json", "csv"):
        kwargs["encoding_errors"] = d.encoding_errors
    try:
        dataset = load_dataset(builder, data_files=files, split="train", cache_dir=d.cache_dir, **kwargs)
    except Exception as err:  # datasets wraps reader errors in DatasetGenerationError
        raise _explain_load_error(err, files) from err
    if builder == "text":
        dataset = dataset.map(_strip_pmid, batched=True, desc="Reading lines")
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
    corpus = clean_corpus(load_corpus(d), d)
    if limit is not None:
        corpus = corpus.select(range(min(limit, len(corpus))))
    return list(corpus["text"])


# ----------------------------------------------------------------------------------------------------------
# Cleaning and splitting


def clean_corpus(dataset: Dataset, d: DataConfig) -> Dataset:
    """Strip whitespace and drop empty or too short documents (`data.min_chars`), reporting the counts."""
    before = len(dataset)
    min_chars = max(d.min_chars, 1)
    dataset = dataset.map(_strip_texts, batched=True, desc="Cleaning")
    dataset = dataset.filter(lambda batch: [len(t) >= min_chars for t in batch["text"]], batched=True,
                             desc="Dropping short documents")
    logger.info("kept %d of %d documents (%d dropped: empty or shorter than %d characters)",
                len(dataset), before, before - len(dataset), min_chars)
    if len(dataset) == 0:
        raise IgeaError(f"data: the corpus has no documents of at least {min_chars} characters ({before} read)")
    return dataset


def _strip_texts(batch: dict[str, list]) -> dict[str, list[str]]:
    return {"text": [(t or "").strip() for t in batch["text"]]}


def split_corpus(corpus: Dataset, validation_split: float | int, seed: int) -> dict[str, Dataset]:
    """A seeded random train/validation split: a fraction (0.05) or a count of documents (500)."""
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


def tokenize_corpus(documents: Dataset, tokenizer: PreTrainedTokenizerBase, d: DataConfig) -> Dataset:
    """Token ids of each document, with a boundary after it.

    `eos` appends the tokenizer's EOS to every document; `special_tokens` lets the tokenizer add its own
    special tokens (what transformers' run_clm.py does, and how the Igea card's models were trained).
    """
    add_eos = d.document_boundary == "eos"
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=not add_eos)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids] if add_eos else ids}

    return documents.map(
        tokenize,
        batched=True,
        num_proc=d.num_proc,
        remove_columns=documents.column_names,
        features=Features({"input_ids": List(Value("int32"))}),
        desc="Tokenizing",
    )


def pack_blocks(
    tokens: Dataset, block_size: int, packing: str = "blocks", cache_dir: str | None = None
) -> tuple[Dataset, dict[str, int]]:
    """Concatenate all documents' tokens in order and cut them into `block_size` blocks (no padding).

    With `packing="documents"` each block also gets `position_ids` that restart at 0 at every document
    start (and at the block start), so attention and positions never cross documents. The tail shorter
    than a block is dropped and reported as `remainder`.
    """
    total = int(pc.sum(pc.list_value_length(tokens.data.column("input_ids"))).as_py() or 0)
    features = {"input_ids": List(Value("int32"))}
    if packing == "documents":
        features["position_ids"] = List(Value("int32"))
    if total < block_size:
        empty = Dataset.from_dict({name: [] for name in features}, features=Features(features))
        return empty, {"tokens": total, "blocks": 0, "remainder": total}
    key = f"{tokens._fingerprint}-{block_size}-{packing}"
    blocks = Dataset.from_generator(
        _generate_blocks,
        features=Features(features),
        gen_kwargs={"tokens": tokens, "block_size": block_size, "with_positions": packing == "documents"},
        cache_dir=cache_dir,
        fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
    )
    stats = {"tokens": total, "blocks": len(blocks), "remainder": total - len(blocks) * block_size}
    return blocks, stats


def _generate_blocks(tokens: Dataset, block_size: int, with_positions: bool):
    """Yield blocks from a stream of tokenized documents, carrying the unfinished block across batches."""
    carry_ids = np.empty(0, dtype=np.int32)
    carry_starts = np.empty(0, dtype=np.int64)  # global index of the document start of each carried token
    offset = 0  # global index of the first carried token
    for batch in tokens.with_format("arrow").iter(batch_size=10_000):
        column = batch.column("input_ids")
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        ids = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        base = offset + len(carry_ids)
        doc_starts = base + np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        carry_ids = np.concatenate((carry_ids, ids))
        if with_positions:
            carry_starts = np.concatenate((carry_starts, np.repeat(doc_starts, lengths)))
        full = len(carry_ids) // block_size
        for b in range(full):
            row = slice(b * block_size, (b + 1) * block_size)
            example = {"input_ids": carry_ids[row]}
            if with_positions:
                block_start = offset + b * block_size
                index = np.arange(block_start, block_start + block_size)
                example["position_ids"] = (index - np.maximum(carry_starts[row], block_start)).astype(np.int32)
            yield example
        used = full * block_size
        carry_ids = carry_ids[used:]
        if with_positions:
            carry_starts = carry_starts[used:]
        offset += used
