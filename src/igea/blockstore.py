"""Packed token blocks on disk: tokenized once, in parallel, then memory-mapped by every rank and every later run.

`build_blocks` tokenizes a stream of document batches (`num_proc` processes) into a flat token file, then cuts
it into the Arrow files that `datasets` memory-maps: fixed-length blocks (`List(Value("uint16"), length=block)`,
int32 when the vocabulary does not fit 16 bits) of the kept documents and of the held-out ones. The flat token
file is a temporary: only the blocks stay on disk. `open_or_build` makes it happen once per key: the local main
process builds into a temporary directory renamed into place when complete (a crash leaves nothing a later run
would trust); every other process only opens the finished files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Value
from datasets.arrow_writer import ArrowWriter
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from igea.errors import IgeaError
from igea.progress import Progress
from igea.rundir import process_alive

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # part of every key: a change of the on-disk layout never reuses old blocks
MANIFEST = "prepared.json"
KEPT, HELD_OUT = "blocks.arrow", "held_out.arrow"
CHUNK_TOKENS = 1 << 22  # tokens cut into blocks at a time in the second pass (bounded memory)
WAIT_SECONDS = 24 * 3600  # how long a non-main process waits for the local main one to finish preparing


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (a vocabulary of at most 65,536, e.g. Minerva's 32,768), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def cache_key(settings: dict[str, Any]) -> str:
    """A short stable hash of everything that changes the blocks."""
    text = json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the tokenizer does to text: its backend's definition and its special tokens.

    Truncation and padding are left out: calls elsewhere (a padded batch) change them, the blocks never use them.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
        definition = json.dumps(definition, sort_keys=True)
    else:
        definition = repr(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, len(tokenizer), tokenizer.all_special_ids, tokenizer.eos_token_id,
             getattr(tokenizer, "split_special_tokens", False)]
    return hashlib.sha256((definition + json.dumps(extra, default=str)).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------------
# Tokenizing


def document_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], document_boundary: str) -> list[list[int]]:
    """Token ids of each document as training sees them: with the tokenizer's own special tokens (the BOS that
    Llama-2, Mistral, Llama-3 and Gemma tokenizers put first; nothing for GPT-2-style ones) and, with `eos`, the
    tokenizer's EOS after each document that does not end with it already. `special_tokens`: the tokenizer's
    own tokens alone, as run_clm.py tokenizes."""
    ids = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    return end_with_eos(ids, tokenizer.eos_token_id) if document_boundary == "eos" else ids


def end_with_eos(ids: list[list[int]], eos: int) -> list[list[int]]:
    """Each row with `eos` appended, unless it ends with it already (a tokenizer that adds EOS itself)."""
    for row in ids:
        if not row or row[-1] != eos:
            row.append(eos)
    return ids


class DocumentEncoder:
    """Token ids of a batch of documents with their boundaries (`document_ids`), as (lengths, flat ids) arrays.

    The ids come from the tokenizer's Rust backend (a copy without truncation or padding), the tokenizer's own
    call minus the Python objects it builds; `check` falls back to that call if the two ever disagree.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, document_boundary: str) -> None:
        self.tokenizer = tokenizer
        self.boundary = document_boundary
        self.eos = tokenizer.eos_token_id
        self.dtype = token_dtype(len(tokenizer))
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        split = bool(getattr(tokenizer, "split_special_tokens", False))
        backend = self.backend
        if backend is not None and (backend.truncation or backend.padding or backend.encode_special_tokens != split):
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(backend.to_str())  # a copy: the tokenizer itself stays as it is
            self.backend.no_truncation()
            self.backend.no_padding()
            self.backend.encode_special_tokens = split

    def check(self, texts: list[str]) -> None:
        """Use the tokenizer's own call from now on unless the fast path gives exactly its ids on `texts`."""
        if self.backend is None or not texts:
            return
        if self.ids(texts) != document_ids(self.tokenizer, texts, self.boundary):
            logger.warning("the tokenizer's backend gives other ids than the tokenizer itself; tokenizing through "
                           "the tokenizer's own call (slower)")
            self.backend = None

    def ids(self, texts: list[str]) -> list[list[int]]:
        if self.backend is None:
            return document_ids(self.tokenizer, texts, self.boundary)
        ids = [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=True)]
        return end_with_eos(ids, self.eos) if self.boundary == "eos" else ids

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.uint32, count=len(ids))
        try:
            flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        except OverflowError:
            raise IgeaError(f"the tokenizer produced a token id beyond its vocabulary of {len(self.tokenizer)} "
                            f"({self.dtype.name} storage)") from None
        return lengths, flat


_worker_encoder: DocumentEncoder | None = None


def _init_worker(encoder: DocumentEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_encoder(texts)


def encode_batches(encoder: DocumentEncoder, batches: Iterable[list[str]], num_proc: int) -> Iterator:
    """`encoder` over `batches`, in order, in `num_proc` processes; at most 2 batches per process in flight."""
    if num_proc <= 1:
        yield from map(encoder, batches)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker, and no fork warning from tokenizers
    try:
        pool = context.Pool(num_proc, initializer=_init_worker, initargs=(encoder,))
    finally:
        if parallelism is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    with pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------------------------------------
# Building


@dataclass
class HeldOut:
    """Which documents to hold out: a fraction (0.05) or a count (500) of them, chosen at random with `seed`."""

    split: float | int = 0
    seed: int = 42

    def count(self, documents: int) -> int:
        split = self.split
        count = round(documents * split) if isinstance(split, float) else split
        if split and count == 0:
            count = 1
        if count and count >= documents:
            raise IgeaError(f"data.validation_split: {split!r} leaves no training documents "
                            f"(corpus has {documents})")
        return count

    def mask(self, documents: int) -> np.ndarray:
        """Which of `documents` documents (in corpus order) are held out: exactly `count(documents)` of them,
        drawn uniformly with `seed`. Anything that needs the run's split (igea.vocab) asks here."""
        chosen = np.zeros(documents, dtype=bool)
        chosen[np.random.default_rng(self.seed).choice(documents, self.count(documents), replace=False)] = True
        return chosen


def build_blocks(batches: Iterable[list[str]], encoder: DocumentEncoder, out_dir: Path, *, block_size: int,
                 packing: str, held_out: HeldOut, num_proc: int = 1, max_tokens: int | None = None,
                 cap_key: str = "max_tokens") -> dict[str, Any]:
    """Tokenize `batches` of documents and write their blocks into `out_dir`; return the counts.

    First pass: every document's ids go, in order, to a flat token file (and its length to a length file); with
    `max_tokens`, reading stops at the last whole document within that many tokens (a large corpus drawn in part;
    a cap below the first document is one error naming `cap_key`; the progress counts the cap's tokens, as the
    corpus' documents would overstate what is left).
    Second pass: the documents `held_out.mask(n)` picks go to the held-out split, the others are kept, and each
    side is cut into `block_size` blocks; the two flat files are then deleted.
    """
    started = time.perf_counter()
    tokens_path, lengths_path = out_dir / "tokens.tmp", out_dir / "lengths.tmp"
    documents = tokens = 0
    capped = False
    encoded = encode_batches(encoder, batches, num_proc)
    progress = None if max_tokens is None else Progress(f"tokenizing within {cap_key}", max_tokens, "tokens",
                                                        logger=logger, say_done=False)
    with open(tokens_path, "wb") as token_file, open(lengths_path, "wb") as length_file:
        for lengths, ids in encoded:
            if max_tokens is not None and tokens + len(ids) >= max_tokens:
                fit = int(np.searchsorted(np.cumsum(lengths, dtype=np.int64), max_tokens - tokens, side="right"))
                if documents + fit == 0:
                    encoded.close()
                    progress.close()
                    raise IgeaError(f"{cap_key}: {max_tokens:,} holds no whole document: the corpus' first has "
                                    f"{int(lengths[0]):,} tokens; raise it (it keeps the first whole documents "
                                    "within the cap)")
                lengths, ids = lengths[:fit], ids[:int(lengths[:fit].sum())]
                capped = True
            token_file.write(ids.data)
            length_file.write(lengths.data)
            documents += len(lengths)
            tokens += len(ids)
            if progress is not None:
                progress.update(len(ids))
            if capped:
                break
    encoded.close()  # a capped read leaves batches unread: the tokenizing processes stop here
    if progress is not None:
        progress.close()
    if capped:
        logger.info("read %d documents, %d tokens: the first whole documents within max_tokens=%d", documents,
                    tokens, max_tokens)
    tokenize_s = time.perf_counter() - started
    count = held_out.count(documents)
    with_positions = packing == "documents"
    kept = BlockWriter(out_dir / KEPT, block_size, encoder.dtype, with_positions)
    held = BlockWriter(out_dir / HELD_OUT, block_size, encoder.dtype, with_positions) if count else None
    held_mask = held_out.mask(documents) if held is not None else None  # one bit a document
    first = 0
    for lengths, ids in _read_chunks(tokens_path, lengths_path, encoder.dtype):
        if held is None:
            kept.add(lengths, ids)
            continue
        chosen = held_mask[first:first + len(lengths)]
        first += len(lengths)
        in_held = np.repeat(chosen, lengths)
        kept.add(lengths[~chosen], ids[~in_held])
        held.add(lengths[chosen], ids[in_held])
    tokens_path.unlink()
    lengths_path.unlink()
    stats = {"kept": kept.close()}
    if held is not None:
        stats["held_out"] = held.close()
    seconds = time.perf_counter() - started
    logger.info("tokenized %d documents into %d tokens in %.1f s (%.0f tokens/s, %d process(es)); blocks written "
                "in %.1f s", documents, tokens, tokenize_s, tokens / max(tokenize_s, 1e-9), max(num_proc, 1),
                seconds - tokenize_s)
    return {"documents": documents, "tokens": tokens, "seconds": round(seconds, 3), "num_proc": max(num_proc, 1),
            "token_dtype": encoder.dtype.name, **stats}


def _read_chunks(tokens_path: Path, lengths_path: Path, dtype: np.dtype) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(document lengths, ids) of whole documents, about CHUNK_TOKENS tokens at a time, read (not mapped)."""
    with open(tokens_path, "rb") as token_file, open(lengths_path, "rb") as length_file:
        while True:
            lengths = np.fromfile(length_file, dtype=np.uint32, count=1 << 16)
            if len(lengths) == 0:
                return
            ends = np.cumsum(lengths, dtype=np.int64)
            start = 0
            while start < len(lengths):  # at least one document per chunk, however long
                base = ends[start - 1] if start else 0
                stop = max(start + 1, int(np.searchsorted(ends, base + CHUNK_TOKENS, side="right")))
                count = int(ends[stop - 1] - base)
                yield lengths[start:stop], np.fromfile(token_file, dtype=dtype, count=count)
                start = stop


def block_features(block_size: int, dtype: np.dtype, with_positions: bool) -> Features:
    """Fixed-length blocks: one flat buffer in Arrow (a fixed_size_list), no per-block offsets."""
    features = {"input_ids": List(Value(dtype.name), length=block_size)}
    if with_positions:
        features["position_ids"] = List(Value(token_dtype(block_size).name), length=block_size)
    return Features(features)


class BlockWriter:
    """Cuts a stream of whole documents into `block_size` blocks, in order, carrying the open block along.

    With positions, each block also gets `position_ids` that restart at 0 at every document start and at the
    block start: a token's position is min(its index in its document, its index in the block).
    """

    def __init__(self, path: Path, block_size: int, dtype: np.dtype, with_positions: bool) -> None:
        self.block_size = block_size
        self.with_positions = with_positions
        self.features = block_features(block_size, dtype, with_positions)
        self.writer = ArrowWriter(features=self.features, path=str(path))
        self.carry_ids = np.empty(0, dtype=dtype)
        self.carry_positions = np.empty(0, dtype=np.int64)  # each carried token's index in its document
        self.documents = self.tokens = self.blocks = 0

    def add(self, lengths: np.ndarray, ids: np.ndarray) -> None:
        self.documents += len(lengths)
        self.tokens += len(ids)
        ids = np.concatenate((self.carry_ids, ids))
        full = len(ids) // self.block_size
        used = full * self.block_size
        if self.with_positions:
            starts = np.cumsum(lengths, dtype=np.int64) - lengths
            in_document = np.arange(len(ids) - len(self.carry_ids), dtype=np.int64) - np.repeat(starts, lengths)
            positions = np.concatenate((self.carry_positions, in_document))
            self.carry_positions = positions[used:]
        if full:
            columns = {"input_ids": _fixed_lists(ids[:used], self.block_size)}
            if self.with_positions:
                in_block = np.minimum(positions[:used].reshape(full, self.block_size), np.arange(self.block_size))
                dtype = np.dtype(self.features["position_ids"].feature.dtype)
                columns["position_ids"] = _fixed_lists(in_block.astype(dtype).ravel(), self.block_size)
            self.writer.write_table(pa.table(columns))
            self.blocks += full
        self.carry_ids = ids[used:]

    def close(self) -> dict[str, int]:
        self.writer.finalize()
        return {"documents": self.documents, "tokens": self.tokens, "blocks": self.blocks,
                "remainder": len(self.carry_ids)}


def _fixed_lists(flat: np.ndarray, size: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), size)


# ----------------------------------------------------------------------------------------------------------
# Once per key: build on the local main process, open everywhere


@dataclass
class PreparedBlocks:
    """A prepared corpus: memory-mapped blocks of the kept and held-out documents, and the manifest's counts."""

    path: Path
    kept: Dataset
    held_out: Dataset | None
    manifest: dict[str, Any] = field(default_factory=dict)
    cache: str = "loaded"


def is_local_main_process() -> bool:
    """True unless a launcher (torchrun, accelerate) says this is not local rank 0."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def open_or_build(root: Path, key: str, settings: dict[str, Any], build: Callable[[Path], dict[str, Any]],
                  wait_seconds: float = WAIT_SECONDS) -> PreparedBlocks:
    """The blocks in `root/key`, built by `build(tmp_dir)` first if they are not there yet.

    Only the local main process builds, under a file lock, into a temporary directory renamed into place
    once complete. Any other process never writes: it opens the finished directory, waiting for it if the
    main process is still building.
    """
    final = root / key
    if (final / MANIFEST).is_file():
        return open_blocks(final)
    if not is_local_main_process():
        return _wait_for(final, wait_seconds)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f"{key}.lock")):
            if (final / MANIFEST).is_file():  # another job built it while this one waited for the lock
                return open_blocks(final)
            _remove_stale_builds(root, key)
            _build_into(final, settings, build)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        raise IgeaError(f"data: cannot write the prepared blocks under '{root}' ({err.strerror}); free space or set "
                        "data.cache_dir to another directory") from err
    prepared = open_blocks(final)
    prepared.cache = "built"
    return prepared


def _build_into(final: Path, settings: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> None:
    """Build in a temporary directory, then rename it to `final` (the manifest is written last)."""
    tmp = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.mkdir()
    try:
        manifest = {"settings": settings, **build(tmp)}
        manifest["files"] = {p.name: p.stat().st_size for p in tmp.iterdir()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not a finished build from another host sharing the disk
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_blocks(path: Path) -> PreparedBlocks:
    """Memory-map a finished directory, after checking its files have the sizes its manifest recorded."""
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    for name, size in manifest.get("files", {}).items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise IgeaError(f"prepared data in '{path}' is damaged ({name}: {actual} bytes, {size} expected); "
                            "delete that directory to prepare the corpus again")
    held_out = Dataset.from_file(str(path / HELD_OUT)) if (path / HELD_OUT).is_file() else None
    return PreparedBlocks(path, Dataset.from_file(str(path / KEPT)), held_out, manifest)


def _wait_for(final: Path, wait_seconds: float) -> PreparedBlocks:
    deadline = time.monotonic() + wait_seconds
    logger.info("waiting for the local main process to prepare %s", final)
    while not (final / MANIFEST).is_file():
        if time.monotonic() > deadline:
            raise IgeaError(f"data: the local main process did not prepare '{final}' within {wait_seconds:.0f} s; "
                            "run `igea prepare CONFIG` first")
        time.sleep(1)
    return open_blocks(final)


def _remove_stale_builds(root: Path, key: str) -> None:
    """Delete what a killed build of this key left on this host (the lock is held: no build is running)."""
    host = socket.gethostname()
    for tmp in root.glob(f"{key}.tmp-{host}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            logger.info("removing %s, left by an interrupted preparation", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
