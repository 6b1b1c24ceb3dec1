"""Keep what the base knew: everyday English beside everyday Italian as shipped held-out sets, the presets that
evaluate both beside the domain, and the warnings about a held-out set too small to mean much or a shipped
held-out text used as training data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import igea
from igea.basemodel import load_tokenizer
from igea.blockstore import document_ids
from igea.config import (
    GENERAL_ENGLISH,
    GENERAL_TEXT,
    SourceConfig,
    held_out_set_names,
    shipped_corpus_path,
    source_name,
    split_sources,
)
from igea.data import SMALL_SET_BLOCKS, prepare_dataset

from conftest import make_config

BLOCK = 64
MEDICAL = re.compile(r"\b(patient|doctor|hospital|disease|medic\w*|clinic\w*|therap\w*|surgery|symptom\w*|"
                     r"diagnos\w*|illness|pill|virus|cancer|pazient\w*|malatti\w*)\b", re.I)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    """Five paragraphs of everyday Italian: a held-out set of a few blocks of 64."""
    path = tmp_path_factory.mktemp("small") / "small.txt"
    lines = Path(shipped_corpus_path(GENERAL_TEXT)).read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:5]) + "\n", encoding="utf-8")
    return path


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_general_english_is_everyday_english_as_large_as_general_italian():
    english = Path(shipped_corpus_path(GENERAL_ENGLISH)).read_text(encoding="utf-8").splitlines()
    italian = Path(shipped_corpus_path(GENERAL_TEXT)).read_text(encoding="utf-8").splitlines()
    assert len(english) == len(italian) == 83 and len(set(english)) == 83
    size = sum(map(len, english)) / sum(map(len, italian))
    assert 0.9 < size < 1.25, size
    text = " ".join(english)
    assert not MEDICAL.search(text), MEDICAL.search(text)
    words = re.findall(r"[a-z']+", text.lower())
    assert words.count("the") > 300 and words.count("della") == 0
    assert source_name(SourceConfig(path=GENERAL_ENGLISH)) == "general_en"


def test_general_english_loads_and_packs_beside_general(tiny_model_dir, corpus_file, tmp_path, caplog):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file,
                      data={"validation_split": 0, "validation_path": {"general": GENERAL_TEXT,
                                                                       "general_en": GENERAL_ENGLISH}})
    tokenizer = load_tokenizer(cfg)
    with caplog.at_level("INFO", logger="igea.data"):
        data = prepare_dataset(cfg, tokenizer)
    sets = data.stats["validation_sets"]
    english = Path(shipped_corpus_path(GENERAL_ENGLISH)).read_text(encoding="utf-8").splitlines()
    tokens = sum(map(len, document_ids(tokenizer, english, "eos")))
    assert sets["general_en"]["documents"] == 83 and sets["general_en"]["tokens"] == tokens
    assert sets["general_en"]["blocks"] == tokens // BLOCK == len(data.validation_sets["general_en"])
    assert list(data.validation_sets) == ["general", "general_en"]
    assert sets["general_en"]["blocks"] >= SMALL_SET_BLOCKS and not warnings_of(caplog)  # large enough at 64


@pytest.mark.parametrize("preset", ["igea-350m", "igea-1b", "igea-3b"])
def test_the_igea_presets_evaluate_both_of_minervas_languages_beside_the_domain(preset):
    cfg = igea.load_config(igea.preset(preset))
    assert held_out_set_names(cfg.data) == ["biomed", "general", "general_en"]
    assert cfg.data.validation_path == {"general": GENERAL_TEXT, "general_en": GENERAL_ENGLISH}
    assert cfg.data.validation_split == 0.05 and [s.path for s in split_sources(cfg.data)] == [cfg.data.path]


def test_a_held_out_set_of_few_blocks_is_named_once_with_what_to_do(tiny_model_dir, corpus_file, small_file,
                                                                    tmp_path, caplog):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file,
                      data={"validation_split": 0, "validation_path": {"general": GENERAL_TEXT,
                                                                       "few": str(small_file)}})
    with caplog.at_level("INFO", logger="igea.data"):
        data = prepare_dataset(cfg, load_tokenizer(cfg))
    blocks = data.stats["validation_sets"]["few"]["blocks"]
    assert 0 < blocks < SMALL_SET_BLOCKS <= data.stats["validation_sets"]["general"]["blocks"]
    assert warnings_of(caplog) == [
        f"held-out set 'few' has only {blocks} blocks of {BLOCK} tokens (fewer than {SMALL_SET_BLOCKS}): its loss "
        "moves with its few texts more than with the model; give it more text or lower data.block_size"]


@pytest.mark.slow
def test_a_run_warns_about_a_small_set_once_and_igea_eval_names_its_own_setting(tiny_model_dir, corpus_file,
                                                                                small_file, tmp_path, caplog):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file,
                      data={"validation_split": 0, "validation_path": {"few": str(small_file)}},
                      training={"max_steps": 1, "eval_steps": 1, "save_steps": 1, "logging_steps": 1})
    with caplog.at_level("INFO"):
        igea.train(cfg)
    small = [w for w in warnings_of(caplog) if "held-out set 'few' has only" in w]
    assert len(small) == 1  # at preparation, not at each evaluation (before training, at step 1)
    caplog.clear()
    with caplog.at_level("INFO"):
        igea.evaluate(str(cfg.output_dir), corpus={"few": str(small_file)})
    small = [w for w in warnings_of(caplog) if "held-out set 'few' has only" in w]
    assert len(small) == 1 and small[0].endswith("lower the block size (--block-size, block_size=)")


@pytest.mark.parametrize("shipped", [GENERAL_TEXT, GENERAL_ENGLISH])
def test_a_shipped_held_out_text_used_for_training_is_named(tiny_model_dir, corpus_file, tmp_path, caplog, shipped):
    sources = [{"path": str(corpus_file), "weight": 0.9}, {"path": shipped, "weight": 0.1}]
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file,
                      data={"path": None, "sources": sources, "validation_split": 0})
    with caplog.at_level("INFO", logger="igea.data"):
        prepare_dataset(cfg, load_tokenizer(cfg))
    assert warnings_of(caplog) == [
        f"data.sources[1].path: {shipped} is a held-out set shipped with igea, not a training corpus: replay repeats "
        "its few thousand tokens again and again, and it no longer measures forgetting; replay from a real general "
        "corpus (README, Measuring forgetting)"]
