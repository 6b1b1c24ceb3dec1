"""Corpus loading in every format, cleaning, splitting and tokenization with document boundaries."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from igea.config import DataConfig
from igea.data import clean_corpus, load_corpus, prepare_dataset, split_corpus, tokenize_corpus
from igea.errors import IgeaError
from igea.modeling import load_tokenizer

from conftest import ITALIAN_DOCS, make_config


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
    with pytest.raises(IgeaError, match=r"latin1.txt' is not valid UTF-8; .*data.encoding_errors: replace"):
        load_corpus(DataConfig(path=str(path)))
    assert texts(DataConfig(path=str(path), encoding_errors="replace")) == ["Il fegato \ufffd grande",
                                                                               "secondo documento"]


def test_unreachable_hub_dataset_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(IgeaError, match="cannot load dataset 'no-org/no-such-corpus'"):
        load_corpus(DataConfig(path="no-org/no-such-corpus"))


def test_split_is_seeded_disjoint_and_sized(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(f"documento numero {i}" for i in range(100)), encoding="utf-8")
    corpus = load_corpus(DataConfig(path=str(path)))
    first, again = split_corpus(corpus, 0.1, seed=1), split_corpus(corpus, 0.1, seed=1)
    other = split_corpus(corpus, 0.1, seed=2)
    assert len(first["validation"]) == 10 and len(first["train"]) == 90
    assert list(first["validation"]["text"]) == list(again["validation"]["text"])
    assert list(first["validation"]["text"]) != list(other["validation"]["text"])
    assert not set(first["validation"]["text"]) & set(first["train"]["text"])
    assert len(split_corpus(corpus, 7, seed=1)["validation"]) == 7
    assert set(split_corpus(corpus, 0, seed=1)) == {"train"}


def test_eos_boundary_after_every_document(tiny_model_dir, tmp_path):
    corpus = _write(tmp_path, ITALIAN_DOCS)
    tokenizer = load_tokenizer(make_config(tmp_path, tiny_model_dir, corpus))
    docs = load_corpus(DataConfig(path=str(corpus)))
    ids = list(tokenize_corpus(docs, tokenizer, DataConfig(document_boundary="eos"))["input_ids"])
    for doc, row in zip(ITALIAN_DOCS, ids, strict=True):
        assert row == tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_special_tokens_boundary_is_what_run_clm_does(tiny_model_dir, tmp_path):
    corpus = _write(tmp_path, ITALIAN_DOCS)
    tokenizer = load_tokenizer(make_config(tmp_path, tiny_model_dir, corpus))
    docs = load_corpus(DataConfig(path=str(corpus)))
    ids = list(tokenize_corpus(docs, tokenizer, DataConfig(document_boundary="special_tokens"))["input_ids"])
    assert ids == [tokenizer(doc)["input_ids"] for doc in ITALIAN_DOCS]


def test_prepare_dataset_reports_every_token(tiny_model_dir, corpus_file, tmp_path):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file)
    data = prepare_dataset(cfg)
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
        prepare_dataset(cfg)


def _write(tmp_path, docs):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def test_cache_is_reused_for_the_same_settings_and_never_for_changed_ones(tiny_model_dir, corpus_file, tmp_path):
    """Packed blocks are cached on disk keyed by tokenizer, block size and cleaning: a change never reuses them."""
    from igea.config import TinyModelConfig
    from igea.modeling import build_tiny_model

    def cache_files(**data) -> set[str]:
        cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data={"cache_dir": str(tmp_path / "cache"), **data})
        return {f["filename"] for f in prepare_dataset(cfg).train.cache_files}

    first = cache_files()
    assert first and cache_files() == first  # same settings: the same files, reused
    assert cache_files(block_size=32).isdisjoint(first)
    assert cache_files(min_chars=200).isdisjoint(first)
    assert cache_files(document_boundary="special_tokens").isdisjoint(first)

    texts = corpus_file.read_text(encoding="utf-8").splitlines()
    other = build_tiny_model(texts, TinyModelConfig(vocab_size=300, max_position_embeddings=512), tmp_path / "other")
    cfg = make_config(tmp_path, other, corpus_file, data={"cache_dir": str(tmp_path / "cache")})
    assert {f["filename"] for f in prepare_dataset(cfg).train.cache_files}.isdisjoint(first)
