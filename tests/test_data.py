"""Corpus loading in every format, cleaning, tokenization with document boundaries, and preparation on disk:
split by documents, tokenized once, reused by every rank and every later run."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

import igea
from igea.basemodel import load_tokenizer
from igea.blockstore import HELD_OUT, KEPT, DocumentEncoder, HeldOut, build_blocks, document_ids, open_or_build
from igea.cli import main
from igea.config import DataConfig
from igea.data import clean_corpus, load_corpus, prepare_dataset, tokenize_corpus
from igea.errors import IgeaError

from conftest import ITALIAN_DOCS, make_config, sentencepiece_tokenizer, write_config


def texts(d: DataConfig) -> list[str]:
    return list(clean_corpus(load_corpus(d), d)["text"])


def test_txt_one_document_a_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(ITALIAN_DOCS) + "\n", encoding="utf-8")
    assert texts(DataConfig(path=str(path))) == ITALIAN_DOCS


def test_txt_pmid_pipe_form_keeps_only_text(tmp_path):
    path = tmp_path / "pubmed.txt"
    path.write_text("".join(f"{1000 + i}|{t}\n" for i, t in enumerate(ITALIAN_DOCS)), encoding="utf-8")
    assert texts(DataConfig(path=str(path))) == ITALIAN_DOCS


def test_jsonl_parquet_csv_with_text_column(tmp_path):
    rows = [{"pmid": str(i), "abstract": t} for i, t in enumerate(ITALIAN_DOCS)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
    for name in ("c.jsonl", "c.parquet", "c.csv"):
        assert texts(DataConfig(path=str(tmp_path / name), text_column="abstract")) == ITALIAN_DOCS, name


def test_globs_lists_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(ITALIAN_DOCS[:3]), encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(ITALIAN_DOCS[3:]), encoding="utf-8")
    assert sorted(texts(DataConfig(path=str(tmp_path / "*.txt")))) == sorted(ITALIAN_DOCS)
    assert sorted(texts(DataConfig(path=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]))) == sorted(ITALIAN_DOCS)
    assert sorted(texts(DataConfig(path=str(tmp_path)))) == sorted(ITALIAN_DOCS)


def test_cleaning_strips_and_drops_short_documents(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("  spazi intorno  \n\n   \nbreve\n" + ITALIAN_DOCS[0] + "\n", encoding="utf-8")
    assert texts(DataConfig(path=str(path))) == ["spazi intorno", "breve", ITALIAN_DOCS[0]]
    assert texts(DataConfig(path=str(path), min_chars=10)) == ["spazi intorno", ITALIAN_DOCS[0]]


def test_missing_text_column_names_the_columns(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"abstract": "testo"}\n', encoding="utf-8")
    with pytest.raises(IgeaError, match="column 'text' is not in .*its columns are: abstract"):
        load_corpus(DataConfig(path=str(path)))


def test_empty_corpus_is_refused(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(IgeaError, match="the corpus has no documents"):
        texts(DataConfig(path=str(path)))


def test_non_utf8_fails_by_default_and_replace_keeps_going(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Il fegato è grande\nsecondo documento\n".encode("latin-1"))
    with pytest.raises(IgeaError, match=r"latin1.txt' is not valid UTF-8 \(line 1\); .*data.encoding_errors: replace"):
        load_corpus(DataConfig(path=str(path)))
    assert texts(DataConfig(path=str(path), encoding_errors="replace")) == ["Il fegato \ufffd grande",
                                                                               "secondo documento"]


def test_unreachable_hub_dataset_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(IgeaError, match="cannot load dataset 'no-org/no-such-corpus'"):
        load_corpus(DataConfig(path="no-org/no-such-corpus"))


def test_eos_boundary_after_every_document(tiny_model_dir, tmp_path):
    corpus = _write(tmp_path, ITALIAN_DOCS)
    tokenizer = load_tokenizer(make_config(tmp_path, tiny_model_dir, corpus))
    docs = load_corpus(DataConfig(path=str(corpus)))
    ids = list(tokenize_corpus(docs, tokenizer, DataConfig(document_boundary="eos"))["input_ids"])
    for doc, row in zip(ITALIAN_DOCS, ids, strict=True):
        assert row == tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_eos_boundary_keeps_the_bos_a_tokenizer_adds_and_never_doubles_its_eos():
    """A Llama-2/Mistral tokenizer puts <s> first: each document is <s> text </s>, on every path (the blocks'
    fast backend, the tokenizer's own call, streaming), as such models were pretrained and as prompts begin."""
    tokenizer = sentencepiece_tokenizer(ITALIAN_DOCS * 20, 300)
    text = ITALIAN_DOCS[0]
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    assert document_ids(tokenizer, [text], "eos") == [expected]
    assert document_ids(tokenizer, [text], "special_tokens") == [expected[:-1]]  # run_clm: the tokenizer's own
    encoder = DocumentEncoder(tokenizer, "eos")
    encoder.check([text])
    assert encoder.backend is not None and encoder([text])[1].tolist() == expected
    tokenizer.add_eos_token = True  # a tokenizer that ends documents itself gets no second EOS
    assert document_ids(tokenizer, [text], "eos") == [expected]


def test_special_tokens_boundary_is_what_run_clm_does(tiny_model_dir, tmp_path):
    corpus = _write(tmp_path, ITALIAN_DOCS)
    tokenizer = load_tokenizer(make_config(tmp_path, tiny_model_dir, corpus))
    docs = load_corpus(DataConfig(path=str(corpus)))
    ids = list(tokenize_corpus(docs, tokenizer, DataConfig(document_boundary="special_tokens"))["input_ids"])
    assert ids == [tokenizer(doc)["input_ids"] for doc in ITALIAN_DOCS]


def test_prepare_dataset_reports_every_token(tiny_model_dir, corpus_file, tmp_path):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file)
    data = igea.prepare_dataset(cfg)  # the public call loads the model's tokenizer itself
    for split, blocks in (("train", data.train), ("validation", data.validation)):
        stats = data.stats[split]
        assert stats["blocks"] == len(blocks) > 0
        assert stats["tokens"] == stats["blocks"] * 64 + stats["remainder"] and 0 <= stats["remainder"] < 64
        assert all(len(row) == 64 for row in blocks["input_ids"])
    assert data.stats["train"]["documents"] + data.stats["validation"]["documents"] == 593


def test_blocks_smaller_than_one_split_are_refused(tiny_model_dir, tmp_path):
    corpus = _write(tmp_path, ITALIAN_DOCS)
    cfg = make_config(tmp_path, tiny_model_dir, corpus, data={"block_size": 512})
    with pytest.raises(IgeaError, match="fewer than one block of data.block_size=512"):
        prepare_dataset(cfg, load_tokenizer(cfg))


def _write(tmp_path, docs):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path




# ----------------------------------------------------------------------------------------------------------
# Preparation on disk: tokenized once, split by documents, kept as memory-mapped blocks


class IndexEncoder:
    """Stands for a tokenizer: document "i" becomes i % 7 + 1 tokens, each equal to i (every token names its
    document)."""

    dtype = np.dtype(np.uint16)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        docs = [[int(t)] * (int(t) % 7 + 1) for t in texts]
        return np.array([len(d) for d in docs], dtype=np.uint32), np.array([t for d in docs for t in d], np.uint16)


def numbered(n: int, batch: int = 100):
    return ([str(i) for i in range(start, min(start + batch, n))] for start in range(0, n, batch))


def document_tokens(ids) -> list[int]:
    return [t for i in ids for t in [i] * (i % 7 + 1)]


def build(tmp_path, name: str, n: int = 3000, held_out: HeldOut | None = None, **kw) -> tuple[Path, dict]:
    out = tmp_path / name
    out.mkdir()
    kw = {"block_size": 1, "packing": "blocks", **kw}
    return out, build_blocks(numbered(n), IndexEncoder(), out, held_out=held_out or HeldOut(0.1, 3), **kw)


def flat(path: Path) -> list[int]:
    return [t for row in Dataset.from_file(str(path))["input_ids"] for t in row]


def test_held_out_documents_are_an_exact_seeded_random_share_and_every_token_is_kept(tmp_path):
    out, stats = build(tmp_path, "a")  # blocks of one token: nothing is left over
    kept, held = flat(out / KEPT), flat(out / HELD_OUT)
    kept_docs, held_docs = sorted(set(kept)), sorted(set(held))

    assert len(held_docs) == stats["held_out"]["documents"] == 300  # exactly 10% of 3000, by documents
    assert set(kept_docs).isdisjoint(held_docs) and len(kept_docs) + len(held_docs) == 3000
    assert kept == document_tokens(kept_docs) and held == document_tokens(held_docs)  # whole, in order
    assert stats["kept"]["tokens"] + stats["held_out"]["tokens"] == stats["tokens"] == len(document_tokens(range(3000)))
    assert held_docs[-1] - held_docs[0] > 2000 and held_docs != list(range(held_docs[0], held_docs[0] + 300))
    assert sorted(set(flat(build(tmp_path, "same")[0] / HELD_OUT))) == held_docs  # seeded
    assert sorted(set(flat(build(tmp_path, "other", held_out=HeldOut(0.1, 4))[0] / HELD_OUT))) != held_docs
    assert build(tmp_path, "count", held_out=HeldOut(7, 3))[1]["held_out"]["documents"] == 7
    assert sorted(p.name for p in out.iterdir()) == sorted([KEPT, HELD_OUT])  # the flat token files are gone


def test_a_held_out_share_that_leaves_no_training_document_is_refused(tmp_path):
    with pytest.raises(IgeaError, match="validation_split: 30 leaves no training documents \\(corpus has 30\\)"):
        build(tmp_path, "all", n=30, held_out=HeldOut(30, 0))


def test_two_processes_write_the_same_blocks_as_one(tmp_path):
    one, one_stats = build(tmp_path, "one", block_size=16, packing="documents")
    two, two_stats = build(tmp_path, "two", block_size=16, packing="documents", num_proc=2)

    for name in (KEPT, HELD_OUT):
        assert Dataset.from_file(str(one / name)).to_dict() == Dataset.from_file(str(two / name)).to_dict()
    assert {k: v for k, v in one_stats.items() if k not in ("seconds", "num_proc")} == \
        {k: v for k, v in two_stats.items() if k not in ("seconds", "num_proc")}


def good_build(directory: Path) -> dict:
    return build_blocks(numbered(200), IndexEncoder(), directory, block_size=4, packing="blocks",
                        held_out=HeldOut(0, 0))


def must_not_build(directory: Path) -> dict:
    raise AssertionError("a process that is not the local main one tokenized the corpus")


def test_a_crash_while_preparing_leaves_nothing_a_later_run_would_trust(tmp_path):
    root = tmp_path / "root"
    killed = root / f"k.tmp-{socket.gethostname()}-999999999"  # what a build killed with SIGKILL leaves
    killed.mkdir(parents=True)
    (killed / KEPT).write_bytes(b"half a file")

    def crash(directory: Path) -> dict:
        (directory / KEPT).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        open_or_build(root, "k", {}, crash)
    assert sorted(p.name for p in root.iterdir()) == ["k.lock"]  # no half directory, the killed one cleared
    prepared = open_or_build(root, "k", {}, good_build)
    assert prepared.cache == "built" and len(prepared.kept) == len(document_tokens(range(200))) // 4


def test_a_full_disk_while_preparing_is_one_line_naming_the_cache(tmp_path):
    def full(directory: Path) -> dict:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(IgeaError, match="cannot write the prepared blocks under .*No space left on device.*cache_dir"):
        open_or_build(tmp_path / "root", "k", {}, full)
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["k.lock"]


def test_damaged_blocks_are_refused(tmp_path):
    prepared = open_or_build(tmp_path, "k", {}, good_build)
    with open(prepared.path / KEPT, "r+b") as f:
        f.truncate(100)
    with pytest.raises(IgeaError, match="is damaged .*delete that directory"):
        open_or_build(tmp_path, "k", {}, must_not_build)


def _other_rank(root: Path, results) -> None:
    os.environ["LOCAL_RANK"] = "1"
    results.put(open_or_build(root, "k", {}, must_not_build, wait_seconds=120).cache)


def test_other_ranks_never_write_they_wait_for_the_main_one_then_open_its_blocks(tmp_path, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(IgeaError, match="the local main process did not prepare"):
        open_or_build(root, "k", {}, must_not_build, wait_seconds=0.2)
    assert not root.exists()  # it wrote nothing at all

    monkeypatch.setenv("LOCAL_RANK", "0")
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    waiting = context.Process(target=_other_rank, args=(root, results))
    waiting.start()  # a rank that starts before the main one has built anything
    time.sleep(1)
    assert open_or_build(root, "k", {}, good_build).cache == "built"
    assert results.get(timeout=60) == "loaded"
    waiting.join(timeout=10)
    files = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert open_or_build(root, "k", {}, must_not_build).cache == "loaded"
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == files


def test_the_corpus_is_tokenized_once_and_kept_as_two_bytes_a_token(tiny_model_dir, corpus_file, tmp_path,
                                                                   monkeypatch):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data={"cache_dir": str(tmp_path / "cache")})
    tokenizer = load_tokenizer(cfg)
    first = prepare_dataset(cfg, tokenizer)
    monkeypatch.setattr(DocumentEncoder, "__call__", must_not_build)
    again = prepare_dataset(cfg, tokenizer)

    assert first.stats["cache"] == "built" and again.stats["cache"] == "loaded"
    assert again.stats["prepared"] == first.stats["prepared"]
    assert again.train["input_ids"] == first.train["input_ids"]
    assert again.validation["input_ids"] == first.validation["input_ids"]
    [directory] = first.stats["prepared"]["dirs"]
    assert first.stats["prepared"]["token_dtype"] == "uint16"
    assert first.train.features["input_ids"].feature.dtype == "uint16"
    blocks = sum(first.stats[s]["blocks"] for s in ("train", "validation"))
    on_disk = sum(p.stat().st_size for p in Path(directory).glob("*.arrow"))
    assert blocks * 64 * 2 <= on_disk <= 1.05 * blocks * 64 * 2


def test_the_prepared_split_is_seeded_disjoint_and_sized(tiny_model_dir, corpus_file, tmp_path):
    def split(**data):
        cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data={"cache_dir": str(tmp_path / "c"), **data})
        return prepare_dataset(cfg, load_tokenizer(cfg))

    first, other = split(validation_split=0.1, seed=1), split(validation_split=0.1, seed=2)
    assert first.stats["validation"]["documents"] == 59 and first.stats["train"]["documents"] == 534
    assert other.stats["validation"]["documents"] == 59
    assert first.validation["input_ids"] != other.validation["input_ids"]
    assert split(validation_split=7).stats["validation"]["documents"] == 7
    assert split(validation_split=0, max_documents=50).validation is None
    assert split(validation_split=0, max_documents=50).stats["train"]["documents"] == 50


def test_cache_is_reused_for_the_same_settings_and_never_for_changed_ones(tiny_model_dir, corpus_file, tmp_path):
    """Prepared blocks are keyed by the corpus files, tokenizer, block size, packing, cleaning and split."""
    from igea.config import TinyModelConfig
    from igea.modeling import build_tiny_model

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_file.read_text(encoding="utf-8"), encoding="utf-8")

    def prepared(model=tiny_model_dir, **data) -> str:
        cfg = make_config(tmp_path, model, corpus, data={"cache_dir": str(tmp_path / "cache"), **data})
        [directory] = prepare_dataset(cfg, load_tokenizer(cfg)).stats["prepared"]["dirs"]
        return directory

    first = prepared()
    assert prepared() == first  # same settings: the same blocks, reused
    changed = [prepared(block_size=32), prepared(min_chars=200), prepared(document_boundary="special_tokens"),
               prepared(packing="documents"), prepared(validation_split=0.2), prepared(seed=7)]
    texts = corpus.read_text(encoding="utf-8").splitlines()
    other = build_tiny_model(texts, TinyModelConfig(vocab_size=300, max_position_embeddings=512), tmp_path / "other")
    changed.append(prepared(model=other))
    with corpus.open("a", encoding="utf-8") as f:
        f.write("Un documento in più alla fine del corpus.\n")
    changed.append(prepared())
    assert len({first, *changed}) == len(changed) + 1


@pytest.mark.slow
def test_igea_prepare_then_train_reuses_the_blocks(tiny_model_dir, corpus_file, tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, "run", tiny_model_dir, corpus_file, max_steps=2)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert main(["prepare", str(config), cache]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["cache"] == "built" and Path(printed["prepared"]["dirs"][0]).is_dir()

    monkeypatch.setattr(DocumentEncoder, "__call__", must_not_build)
    result = igea.train(igea.load_config(config, [cache, "eval.before_training=false", "training.eval_strategy=no"]))
    assert result.metrics["data"]["cache"] == "loaded"
    assert result.metrics["data"]["prepared"] == printed["prepared"]
    assert result.metrics["data"]["train"] == printed["train"]


def test_a_bad_record_met_while_streaming_stops_the_run_with_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from igea.trainer import IgeaTrainer

    good = tmp_path / "a.jsonl"  # 1000 documents: preparing the stream reads no further than this file
    good.write_text("".join(json.dumps({"text": t}) + "\n" for t in ITALIAN_DOCS * 125), encoding="utf-8")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "Il fegato è una ghiandola."}\n{"text": "interrotto\n', encoding="utf-8")
    config = write_config(tmp_path, "run", tiny_model_dir, good, max_steps=2)
    overrides = [f"data.path=[{good}, {bad}]", "data.streaming=true", "data.validation_split=1", "data.block_size=8",
                 "eval.before_training=false"]
    started = []
    original = IgeaTrainer.train
    monkeypatch.setattr(IgeaTrainer, "train", lambda self, **kw: started.append(1) or original(self, **kw))

    assert main(["train", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert started  # the second file was first read by the training loop, filling its shuffle buffer
    assert err.rstrip().splitlines()[-1].startswith("igea: error: data.path: ") and "Traceback" not in err
    assert "b.jsonl' line 2 is not valid JSON" in err
