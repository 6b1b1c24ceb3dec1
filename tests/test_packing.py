"""Packing proofs: every token kept in order, positions restart per document, `documents` packing is exact.

Both packers are held to the same proofs: `pack_blocks` (in-memory datasets: held-out evaluation, streamed
validation) and `blockstore.BlockWriter` (the blocks prepared on disk, fed whole documents a few at a time).
The exactness test is the point of `data.packing: documents`: a block holding several documents must train
the model exactly as if each document had been run alone, under both attention implementations.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from igea.blockstore import BlockWriter, DocumentEncoder, token_dtype
from igea.config import DataConfig
from igea.data import BlockCollator, pack_blocks, tokenize_corpus
from igea.metrics import IGNORE_INDEX
from igea.modeling import train_bpe_tokenizer

from conftest import real_abstracts

PACKERS = ["pack_blocks", "block_writer"]


def token_dataset(documents: list[list[int]]) -> Dataset:
    return Dataset.from_dict({"input_ids": documents})


def pack(documents: list[list[int]], block_size: int, packing: str, tmp_path, packer: str) -> tuple[Dataset, dict]:
    """`documents` (token ids) cut into blocks by `packer`; the BlockWriter gets them 3 at a time, so the
    open block is carried from one call to the next as it is across read chunks."""
    if packer == "pack_blocks":
        return pack_blocks(token_dataset(documents), block_size, packing, str(tmp_path))
    path = tmp_path / f"blocks-{block_size}-{packing}.arrow"
    writer = BlockWriter(path, block_size, token_dtype(1000), packing == "documents")
    for start in range(0, len(documents), 3):
        part = documents[start: start + 3]
        writer.add(np.array([len(d) for d in part], dtype=np.uint32),
                   np.array([t for d in part for t in d], dtype=np.uint16))
    counts = writer.close()
    return Dataset.from_file(str(path)), {key: counts[key] for key in ("tokens", "blocks", "remainder")}


def reference_positions(lengths: list[int], block_size: int) -> list[list[int]]:
    """Positions by counting: 0 at every document start and every block start, +1 otherwise."""
    starts = set(np.cumsum([0, *lengths[:-1]]).tolist())
    blocks, position = [], 0
    for index in range(sum(lengths) // block_size * block_size):
        position = 0 if index in starts or index % block_size == 0 else position + 1
        if index % block_size == 0:
            blocks.append([])
        blocks[-1].append(position)
    return blocks


def sentences(limit: int) -> list[str]:
    """Short real Italian documents: the sentences of the first shared abstracts."""
    parts = [s for text in real_abstracts(limit=limit) for s in re.split(r"(?<=\.)\s+", text)]
    return [s for s in parts if len(s) > 20]


# ----------------------------------------------------------------------------------------------------------
# pack_blocks: no token lost, none reordered, exact lengths


@pytest.mark.parametrize("packer", PACKERS)
@pytest.mark.parametrize("packing", ["blocks", "documents"])
@pytest.mark.parametrize("block_size", [2, 7, 64])
def test_pack_blocks_keeps_every_token_in_order(block_size, packing, packer, tmp_path):
    rng = random.Random(block_size)
    documents = [[rng.randrange(1, 500) for _ in range(rng.randrange(1, 150))] for _ in range(40)]
    stream = [t for doc in documents for t in doc]

    blocks, stats = pack(documents, block_size, packing, tmp_path, packer)

    rows = blocks["input_ids"]
    assert all(len(row) == block_size for row in rows)
    assert [t for row in rows for t in row] == stream[: len(rows) * block_size]
    assert stats["tokens"] == len(stream)
    assert stats["blocks"] == len(rows) == len(stream) // block_size
    assert stats["tokens"] == stats["blocks"] * block_size + stats["remainder"]
    assert 0 <= stats["remainder"] < block_size


@pytest.mark.parametrize("packer", PACKERS)
def test_position_ids_restart_at_each_document_and_block(packer, tmp_path):
    # documents of 3, 5 and 2 tokens in blocks of 4: the second document starts at index 3 and
    # continues into the second block, where its positions restart at the block start
    documents = [[11, 12, 13], [21, 22, 23, 24, 25], [31, 32]]

    blocks, stats = pack(documents, 4, "documents", tmp_path, packer)

    assert blocks["input_ids"] == [[11, 12, 13, 21], [22, 23, 24, 25]]
    assert blocks["position_ids"] == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert stats == {"tokens": 10, "blocks": 2, "remainder": 2}


@pytest.mark.parametrize("packer", PACKERS)
def test_position_ids_match_a_counting_reference_across_reader_batches(packer, tmp_path):
    # more than 10,000 documents: pack_blocks reads 10,000 at a time and must carry the open block over
    rng = random.Random(0)
    documents = [[rng.randrange(1, 500) for _ in range(rng.randrange(1, 6))] for _ in range(10_500)]
    lengths = [len(d) for d in documents]

    blocks, stats = pack(documents, 7, "documents", tmp_path, packer)

    assert blocks["position_ids"] == reference_positions(lengths, 7)
    stream = [t for d in documents for t in d]
    assert [t for row in blocks["input_ids"] for t in row] == stream[: stats["blocks"] * 7]


@pytest.mark.parametrize("packer", PACKERS)
def test_blocks_packing_has_no_position_ids(packer, tmp_path):
    blocks, _ = pack([[1, 2, 3], [4, 5, 6]], 2, "blocks", tmp_path, packer)
    assert blocks.column_names == ["input_ids"]


def test_prepared_blocks_are_uint16_when_the_vocabulary_fits_else_int32(tmp_path):
    assert token_dtype(32768) == token_dtype(65536) == np.uint16  # Minerva's vocabulary: two bytes a token
    assert token_dtype(65537) == np.int32
    writer = BlockWriter(tmp_path / "wide.arrow", 2, token_dtype(100_000), with_positions=False)
    writer.add(np.array([4], dtype=np.uint32), np.array([70_000, 99_999, 1, 65_536], dtype=np.int32))
    writer.close()
    blocks = Dataset.from_file(str(tmp_path / "wide.arrow"))
    assert blocks.features["input_ids"].feature.dtype == "int32"
    assert blocks["input_ids"] == [[70_000, 99_999], [1, 65_536]]


# ----------------------------------------------------------------------------------------------------------
# tokenize_corpus: one EOS after every document


def test_tokenize_corpus_puts_eos_after_every_document(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = sentences(limit=3)
    eos = tokenizer.eos_token_id

    tokens = tokenize_corpus(Dataset.from_dict({"text": texts}), tokenizer, DataConfig())
    blocks, stats = pack_blocks(tokens, 16, "documents", str(tmp_path))

    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    assert tokens["input_ids"] == expected
    stream = np.array([t for row in blocks["input_ids"] for t in row])
    ends = np.cumsum([len(e) for e in expected]) - 1
    assert np.flatnonzero(stream == eos).tolist() == ends[ends < len(stream)].tolist()
    positions = np.array([p for row in blocks["position_ids"] for p in row])
    assert (positions[ends[ends < len(stream) - 1] + 1] == 0).all()  # the token after each EOS starts over


@pytest.mark.parametrize("boundary", ["eos", "special_tokens"])
def test_document_encoder_gives_the_tokenizers_own_ids(tiny_model_dir, boundary):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = sentences(limit=3)
    encoder = DocumentEncoder(tokenizer, boundary)
    encoder.check(texts)

    lengths, ids = encoder(texts)

    expected = tokenize_corpus(Dataset.from_dict({"text": texts}), tokenizer,
                               DataConfig(document_boundary=boundary))["input_ids"]
    assert encoder.backend is not None and ids.dtype == np.uint16  # the fast path, two bytes a token
    assert lengths.tolist() == [len(e) for e in expected]
    assert ids.tolist() == [t for e in expected for t in e]


def test_document_encoder_ignores_a_truncation_saved_with_the_tokenizer_and_leaves_it_alone(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)  # as some tokenizer.json files carry it
    text = sentences(limit=1)[0]

    lengths, ids = DocumentEncoder(tokenizer, "eos")([text])

    assert tokenizer.backend_tokenizer.truncation["max_length"] == 4  # the encoder worked on a copy
    assert len(ids) > 5
    assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_document_encoder_falls_back_to_the_tokenizer_when_its_backend_disagrees(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = sentences(limit=2)
    encoder = DocumentEncoder(tokenizer, "eos")
    encoder.backend = train_bpe_tokenizer(texts, 300).backend_tokenizer  # another vocabulary
    encoder.check(texts[:4])

    lengths, ids = encoder(texts)

    assert encoder.backend is None
    assert ids.tolist() == [t for x in texts for t in tokenizer(x, add_special_tokens=False)["input_ids"]
                            + [tokenizer.eos_token_id]]


# ----------------------------------------------------------------------------------------------------------
# Exactness: a packed block trains like its documents run one by one


@pytest.fixture(scope="module", params=PACKERS)
def packed_documents(request, tiny_model_dir, tmp_path_factory):
    """Three 192-token blocks of real sentences (2 to 4 documents each), with restarting position_ids."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = tokenize_corpus(Dataset.from_dict({"text": sentences(limit=4)}), tokenizer, DataConfig())
    blocks, stats = pack(list(tokens["input_ids"]), 192, "documents", tmp_path_factory.mktemp("packed"),
                         request.param)
    assert stats["blocks"] >= 3
    return [blocks[i] for i in range(3)]


def load_tiny(model_dir, attn_implementation: str):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn_implementation,
                                                 dtype=torch.float32)
    model.config.use_cache = False  # as igea.train sets it for packing=documents
    return model.eval()


def segments(position_ids: list[int]) -> list[slice]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def run_alone(model, examples: list[dict], logits: torch.Tensor) -> tuple[float, int, list[list[float]]]:
    """Each document of each block run by itself: token-weighted loss sum, target count, and per block, for
    each of its documents, the largest gap between its logits alone and its logits in the packed `logits`."""
    loss_sum, targets, gaps = 0.0, 0, []
    for row, example in enumerate(examples):
        gaps.append([])
        for part in segments(example["position_ids"]):
            ids = torch.tensor([example["input_ids"][part]])
            alone = model(input_ids=ids, labels=ids if ids.shape[1] > 1 else None)
            if ids.shape[1] > 1:  # a one-token piece has nothing to predict
                loss_sum += alone.loss.item() * (ids.shape[1] - 1)
                targets += ids.shape[1] - 1
            gaps[-1].append((logits[row, part] - alone.logits[0]).abs().max().item())
    return loss_sum, targets, gaps


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_documents_packing_loss_equals_documents_run_alone(tiny_model_dir, packed_documents,
                                                           attn_implementation):
    model = load_tiny(tiny_model_dir, attn_implementation)
    batch = BlockCollator()(packed_documents)

    with torch.no_grad():
        packed = model(**batch)
        loss_sum, targets, gaps = run_alone(model, packed_documents, packed.logits)

    assert all(len(block) > 1 for block in gaps)  # the blocks really hold several documents each
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == targets  # document starts are not targets
    assert packed.loss.item() == pytest.approx(loss_sum / targets, abs=1e-5)
    assert max(max(block) for block in gaps) < 1e-4


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_blocks_packing_lets_documents_see_each_other(tiny_model_dir, packed_documents, attn_implementation):
    """Without position_ids the same targets get another loss: attention and positions cross documents."""
    model = load_tiny(tiny_model_dir, attn_implementation)
    documents = BlockCollator()(packed_documents)
    same_targets_no_positions = {"input_ids": documents["input_ids"], "labels": documents["labels"]}

    with torch.no_grad():
        crossing = model(**same_targets_no_positions)
        loss_sum, targets, gaps = run_alone(model, packed_documents, crossing.logits)

    assert abs(crossing.loss.item() - loss_sum / targets) > 1e-4
    assert all(block[0] < 1e-4 for block in gaps)  # a block's first document has nothing before it to see
    assert min(min(block[1:]) for block in gaps) > 0.1  # every later one sees the documents before it
