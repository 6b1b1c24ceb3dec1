"""Streamed corpora (`data.streaming`): documents read, tokenized and cut into blocks on the fly, shuffled,
mixed by weight, and resumable from a checkpoint without replaying the stream.

A `BlockStream` is a torch IterableDataset. Its position is small and exact: the epoch, how many blocks were
mixed, and per source how many blocks it gave this epoch and where the shuffle window holding the next one
starts in the document stream (a `Position`: the `datasets` reader state before a batch of documents, the
tokens carried into the next block, and how many blocks of that batch come before the window). Each
checkpoint stores it (`igea_stream.json`) and `--resume` continues from it: per source it re-tokenizes at most
one window and one batch of documents, wherever the run stopped. The `datasets` reader skips the documents
before that point without tokenizing them (it still reads the raw text files up to there).

Why this design:
- transformers 5.24's Trainer does not save a dataloader's state (accelerate's `use_stateful_dataloader` only
  makes a loader that could), and a `datasets` stream built with `from_generator` + `shuffle` is restored by
  replaying its generator, its shuffle buffer lost (datasets says so); the Trainer's own resume replays.
- Blocks are shuffled in windows: read `data.shuffle_buffer` blocks, permute them with a seed drawn from
  (seed, source, epoch, window), hand them out. Resuming means re-reading the current window only, where a
  buffer shuffle would have to store its whole buffer in every checkpoint; each epoch is shuffled anew.
- Sources are chosen block by block with draws from (seed, epoch, chunk), so the mixing resumes exactly too.
  When a source runs out, `data.mix` decides: `primary` ends the epoch with the first source and starts the
  others over, each pass in a new order; `all_exhausted` ends it once every source has run out;
  `first_exhausted` with the first source to run out. The next epoch starts by itself: the stream never ends,
  a streamed run is sized by `training.max_steps` or `data.token_budget`.

The DataLoader and accelerate read a batch or two ahead of the step being trained, so the stream remembers
its position before each of the last blocks it handed out and saves the one after the blocks really trained
(global step x global batch). Only the main process needs it: with several processes accelerate has the main
process read the stream and send each rank its share (or, with `dispatch_batches: false`, every rank reads
the same stream and keeps its slice), so one saved position serves every rank.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import IterableDataset
from transformers import PreTrainedTokenizerBase

from igea.blockstore import document_ids
from igea.config import DataConfig
from igea.errors import IgeaError
from igea.rundir import write_json_atomic

logger = logging.getLogger(__name__)

DOCUMENT_BATCH = 256
"""Documents read and tokenized at a time; a resume re-reads at most one such batch per source."""
MIX_CHUNK = 4096
"""Source choices drawn at a time (each chunk from its own seed, so any block's source is found directly)."""
TRAIL = 16384
"""Positions remembered of the last blocks handed out: more than the loaders ever read ahead."""
STATE_FILE = "igea_stream.json"
"""The stream's position, written into every checkpoint of a streamed run."""


# ----------------------------------------------------------------------------------------------------------
# One source: documents -> blocks, from any saved position


@dataclass(frozen=True, eq=False)
class Position:
    """Where a source's next block comes from: a batch of documents, and how many of its blocks come first."""

    reader: dict[str, Any] | None = None  # `datasets` stream state before the batch (None: the first document)
    carry_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))  # unfinished block
    carry_pos: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # their in-document positions
    skip: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"reader": self.reader, "carry_ids": self.carry_ids.tolist(), "carry_pos": self.carry_pos.tolist(),
                "skip": self.skip}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Position:
        return cls(raw["reader"], np.asarray(raw["carry_ids"], dtype=np.int32),
                   np.asarray(raw["carry_pos"], dtype=np.int64), int(raw["skip"]))


class SourceBlocks:
    """One source's documents cut into blocks in order, every token kept, starting at a `Position`.

    Documents are read and tokenized `DOCUMENT_BATCH` at a time; the tokens after the last full block are
    carried into the next batch. `position()` says where the next block comes from, at any time.
    """

    def __init__(self, documents: IterableDataset, tokenize: Callable[[list[str]], list[list[int]]],
                 block_size: int, with_positions: bool, start: Position) -> None:
        self.tokenize, self.block_size, self.with_positions = tokenize, block_size, with_positions
        self.documents = documents
        documents.load_state_dict(start.reader)
        self._batches = documents.iter(batch_size=DOCUMENT_BATCH)
        self._start = start  # the batch being cut (before the first read: where reading starts)
        self._after: Position | None = None  # after the batch being cut (None: nothing read yet)
        self._ids = self._pos = np.empty((0, block_size), dtype=np.int32)
        self._used = 0

    def position(self) -> Position:
        if self._after is None:
            return self._start
        if self._used < len(self._ids):
            return Position(self._start.reader, self._start.carry_ids, self._start.carry_pos, self._used)
        return self._after

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The next `n` blocks (fewer at the end of the source): token ids and, with positions, position ids."""
        ids, pos, have = [], [], 0
        while have < n:
            if self._used == len(self._ids) and not self._read():
                break
            k = min(n - have, len(self._ids) - self._used)
            ids.append(self._ids[self._used:self._used + k])
            if self.with_positions:
                pos.append(self._pos[self._used:self._used + k])
            self._used += k
            have += k
        empty = np.empty((0, self.block_size), dtype=np.int32)
        if not self.with_positions:
            return np.concatenate(ids) if ids else empty, None
        return (np.concatenate(ids), np.concatenate(pos)) if ids else (empty, empty)

    def _read(self) -> bool:
        batch = next(self._batches, None)
        if batch is None:
            return False
        first = self._after is None
        start = self._start if first else self._after
        docs = self.tokenize(batch["text"])
        self._ids, self._pos, carry_ids, carry_pos = cut_blocks(start.carry_ids, start.carry_pos, docs,
                                                                self.block_size, self.with_positions)
        self._start = Position(start.reader, start.carry_ids, start.carry_pos)
        self._after = Position(self.documents.state_dict(), carry_ids, carry_pos)
        self._used = start.skip if first else 0
        if self._used > len(self._ids):
            raise IgeaError("the saved stream position does not match the corpus (was the corpus changed?)")
        return True


def cut_blocks(carry_ids: np.ndarray, carry_pos: np.ndarray, docs: list[list[int]], block_size: int,
               with_positions: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Full blocks of (carry + documents) and the new carry.

    Position ids restart at 0 at every document start and at the block start (as `data.pack_blocks` makes
    them): each token's position in its document, capped by its index in the block.
    """
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    ids = np.concatenate((carry_ids, np.fromiter(chain.from_iterable(docs), dtype=np.int32, count=lengths.sum())))
    full = len(ids) // block_size
    used = full * block_size
    blocks = ids[:used].reshape(full, block_size)
    if not with_positions:
        return blocks, None, ids[used:], carry_pos
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.concatenate((carry_pos, np.arange(lengths.sum(), dtype=np.int64) - starts))
    positions = np.minimum(pos[:used].reshape(full, block_size), np.arange(block_size)).astype(np.int32)
    return blocks, positions, ids[used:], pos[used:]


# ----------------------------------------------------------------------------------------------------------
# Shuffle windows


class WindowedSource:
    """A source's blocks of one epoch, shuffled in windows; resumes at any block from (taken, window start).

    With `limit`, a pass over the source ends after its first `limit` blocks (`data.sources[].max_tokens`).
    """

    def __init__(self, make_blocks: Callable[[Position], SourceBlocks], window: int, seed: list[int],
                 taken: int = 0, start: Position | None = None, passes: int = 0, limit: int | None = None) -> None:
        self.make_blocks, self.window, self.seed, self.limit = make_blocks, window, seed, limit
        self.taken = taken  # blocks given in this pass
        self.passes = passes  # earlier passes over the source in this epoch (it started over)
        self._start = start or Position()  # where the window holding block `taken` starts
        self._cutter: SourceBlocks | None = None
        self._loaded: int | None = None  # index of the window in memory
        self._after: Position | None = None  # where the window after it starts
        self._ids = self._pos = None

    def resume_point(self) -> tuple[int, Position]:
        """(blocks given, start of the window holding the next block): enough to continue from here."""
        index = self.taken // self.window
        if self._loaded is None or self._loaded == index:
            return self.taken, self._start
        return self.taken, self._after  # the window in memory is used up: the next one starts after it

    def next_block(self) -> dict[str, list[int]] | None:
        """The next block, or None once the source has run out this epoch."""
        index, offset = divmod(self.taken, self.window)
        if self._loaded != index:
            if self._loaded is not None:
                self._start = self._after
            if self._cutter is None:
                self._cutter = self.make_blocks(self._start)
            size = self.window if self.limit is None else max(0, min(self.window, self.limit - index * self.window))
            self._ids, self._pos = self._cutter.take(size)
            self._after = self._cutter.position()
            if self.window > 1:
                order = np.random.default_rng([*self.seed, index]).permutation(len(self._ids))
                self._ids = self._ids[order]
                self._pos = self._pos[order] if self._pos is not None else None
            self._loaded = index
        if offset >= len(self._ids):
            return None
        self.taken += 1
        block = {"input_ids": self._ids[offset].tolist()}
        if self._pos is not None:
            block["position_ids"] = self._pos[offset].tolist()
        return block


# ----------------------------------------------------------------------------------------------------------
# The mixed, resumable stream


class BlockStream(torch.utils.data.IterableDataset):
    """Training blocks of one or more streamed sources, windowed-shuffled and mixed by weight, resumable.

    Iterating starts at the loaded position (the beginning, or a checkpoint's); the stream is endless, one
    epoch after another. With several sources each block carries its `source` index. A source's `max_tokens`
    (None: no cap) ends each pass over it after its first max_tokens // block_size blocks: it starts over sooner.
    """

    def __init__(self, parts: list[IterableDataset], labels: list[str], weights: list[float],
                 tokenizer: PreTrainedTokenizerBase, d: DataConfig, seed: int,
                 explain: Callable[[int], AbstractContextManager] | None = None,
                 max_tokens: list[int | None] | None = None) -> None:
        super().__init__()
        self.parts, self.labels, self.tokenizer = parts, labels, tokenizer
        self.explain = explain or (lambda index: nullcontext())  # turns a read error of source i into one line
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.boundary = d.document_boundary
        self.block_size, self.with_positions = d.block_size, d.packing == "documents"
        self.window, self.seed = max(d.shuffle_buffer, 1), seed
        self.mix = d.mix if len(parts) > 1 else "first_exhausted"  # one source: its end ends the epoch
        self.layout = {"block_size": d.block_size, "packing": d.packing, "document_boundary": d.document_boundary,
                       "shuffle_buffer": self.window, "seed": seed, "sources": labels, "weights": list(weights),
                       "mix": self.mix}
        self.limits = [None if m is None else m // d.block_size for m in max_tokens or [None] * len(parts)]
        if any(limit is not None for limit in self.limits):  # only when set: older checkpoints keep resuming
            self.layout["max_tokens"] = list(max_tokens)
        self._start = {"blocks": 0, "epoch": 0, "mixed": 0,
                       "sources": [{"taken": 0, "window": Position(), "passes": 0} for _ in parts]}
        self._trail: deque[tuple[int, int, int, tuple[tuple[int, Position], ...]]] = deque(maxlen=TRAIL)
        self._choices: tuple[tuple[int, int], np.ndarray] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        state = self._start
        blocks, epoch, mixed = state["blocks"], state["epoch"], state["mixed"]
        sources = [self._source(i, epoch, s.get("passes", 0), s["taken"], s["window"])
                   for i, s in enumerate(state["sources"])]
        self._trail.clear()
        self._remember(blocks, epoch, mixed, sources)
        while True:
            index = self._source_of(epoch, mixed)
            with self.explain(index):
                block = sources[index].next_block()
            if block is None and sources[index].taken == 0:
                raise IgeaError(f"data: the streamed corpus '{self.labels[index]}' has fewer tokens than one "
                                f"block of data.block_size={self.block_size}")
            if block is None and self._epoch_ends(index, sources):
                epoch, mixed = epoch + 1, 0
                sources = [self._source(i, epoch, 0) for i in range(len(self.parts))]
                self._remember(blocks, epoch, mixed, sources)
                continue
            if block is None:  # this source starts over, in a new order; the epoch goes on
                sources[index] = self._source(index, epoch, sources[index].passes + 1)
                continue
            blocks, mixed = blocks + 1, mixed + 1
            if len(self.parts) > 1:
                block["source"] = index
            self._remember(blocks, epoch, mixed, sources)
            yield block

    def _epoch_ends(self, index: int, sources: list[WindowedSource]) -> bool:
        """Source `index` just ran out: does the epoch end (`data.mix`), or does the source start over?"""
        if self.mix == "first_exhausted":
            return True
        if self.mix == "primary":
            return index == 0
        return all(s.passes > 0 or i == index for i, s in enumerate(sources))  # all_exhausted: every one ran out

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return document_ids(self.tokenizer, texts, self.boundary)

    def _source(self, index: int, epoch: int, passes: int, taken: int = 0,
                start: Position | None = None) -> WindowedSource:
        """Source `index` in `epoch`, after `passes` earlier passes over it in that epoch, at block `taken`."""
        documents = self.parts[index]

        def make_blocks(at: Position) -> SourceBlocks:
            return SourceBlocks(documents, self.tokenize, self.block_size, self.with_positions, at)

        seed = [self.seed, index, epoch] + ([passes] if passes else [])  # a new order for each pass
        return WindowedSource(make_blocks, self.window, seed, taken, start, passes, self.limits[index])

    def _source_of(self, epoch: int, mixed: int) -> int:
        """The source of the `mixed`-th block of an epoch, drawn by weight."""
        if len(self.parts) == 1:
            return 0
        chunk, offset = divmod(mixed, MIX_CHUNK)
        if self._choices is None or self._choices[0] != (epoch, chunk):
            draws = np.random.default_rng([self.seed, epoch, chunk]).choice(len(self.parts), size=MIX_CHUNK,
                                                                             p=self.probabilities)
            self._choices = ((epoch, chunk), draws)
        return int(self._choices[1][offset])

    def _remember(self, blocks: int, epoch: int, mixed: int, sources: list[WindowedSource]) -> None:
        entry = (blocks, epoch, mixed, tuple((*s.resume_point(), s.passes) for s in sources))
        if self._trail and self._trail[-1][0] == blocks:
            self._trail[-1] = entry  # a new epoch starts at the same block count
        else:
            self._trail.append(entry)

    def position_after(self, blocks: int) -> dict[str, Any] | None:
        """The position after `blocks` blocks were handed out (JSON-ready); None if it was not among the last."""
        if not self._trail or not 0 <= blocks - self._trail[0][0] < len(self._trail):
            return None
        count, epoch, mixed, points = self._trail[blocks - self._trail[0][0]]
        return {"format": 1, "blocks": count, "epoch": epoch, "mixed": mixed, "layout": self.layout,
                "sources": [{"taken": taken, "window": start.to_dict(), "passes": passes}
                            for taken, start, passes in points]}

    def load_position(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses one saved with other data settings."""
        saved = {"mix": "first_exhausted", **state["layout"]}  # saved before data.mix: its end ended the epoch
        changed = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in self.layout.items()
                   if saved.get(key) != value]
        if changed:
            raise IgeaError(f"--resume: the streamed data settings changed since the checkpoint "
                            f"({'; '.join(changed)}); resume with the settings it was trained with")
        self._start = {"blocks": state["blocks"], "epoch": state["epoch"], "mixed": state["mixed"],
                       "sources": [{"taken": s["taken"], "window": Position.from_dict(s["window"]),
                                    "passes": s.get("passes", 0)} for s in state["sources"]]}

    def save(self, folder: Path, blocks: int) -> None:
        """Write the position after `blocks` trained blocks into a checkpoint folder (the main process calls it)."""
        state = self.position_after(blocks)
        if state is None:
            logger.warning("the stream position after %d blocks is not known; resuming from this checkpoint will "
                           "replay the stream", blocks)
            return
        write_json_atomic(folder / STATE_FILE, state)

    def restore(self, checkpoint: Path) -> bool:
        """Continue from a checkpoint's saved position; False if it has none (the Trainer then replays)."""
        path = checkpoint / STATE_FILE
        if not path.is_file():
            logger.warning("%s has no stream position: the stream is replayed up to it", checkpoint)
            return False
        state = json.loads(path.read_text(encoding="utf-8"))
        self.load_position(state)
        logger.info("stream resumes at block %d (epoch %d) without replaying it", state["blocks"], state["epoch"])
        return True
