"""Streaming corpora (on-the-fly packing, resume in place) and weighted mixing of several corpora."""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch

from igea.config import ConfigError, sample_corpus_path
from igea.data import prepare_dataset
from igea.modeling import load_tokenizer

from conftest import make_config

train_module = importlib.import_module("igea.train")


class Interrupted(Exception):
    """Stands for a crash right after a checkpoint was written."""


def train_until_first_checkpoint(cfg, monkeypatch) -> None:
    original = train_module.IgeaTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        original(self, model, trial)
        raise Interrupted

    monkeypatch.setattr(train_module.IgeaTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train_module.train(cfg)
    monkeypatch.setattr(train_module.IgeaTrainer, "_save_checkpoint", original)


def streaming_config(tmp_path, model_dir, corpus, **training):
    return make_config(
        tmp_path, model_dir, corpus,
        data={"streaming": True, "validation_split": 20, "shuffle_buffer": 64},
        training={"max_steps": 10, "save_steps": 5, "eval_steps": 10, "logging_steps": 5, **training},
    )


def test_a_stream_packs_the_same_blocks_as_the_map_style_pipeline(tiny_model_dir, corpus_file, tmp_path):
    common = {"validation_split": 0, "block_size": 32}
    mapped = make_config(tmp_path, tiny_model_dir, corpus_file, data=common)
    streamed = make_config(tmp_path, tiny_model_dir, corpus_file,
                           data={**common, "streaming": True, "shuffle_buffer": 1}, training={"max_steps": 5})
    tokenizer = load_tokenizer(mapped)
    expected = prepare_dataset(mapped, tokenizer).train["input_ids"]
    got = [row["input_ids"] for row in prepare_dataset(streamed, tokenizer).train]
    assert [list(map(int, r)) for r in got] == [list(r) for r in expected]


def test_streaming_needs_steps_or_a_token_budget_and_a_validation_count(tiny_model_dir, corpus_file, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of training.max_steps and data.token_budget"):
        make_config(tmp_path, tiny_model_dir, corpus_file, data={"streaming": True, "validation_split": 10},
                    training={"max_steps": -1})
    with pytest.raises(ConfigError, match="is a fraction, which a streamed corpus cannot take"):
        make_config(tmp_path, tiny_model_dir, corpus_file, data={"streaming": True, "validation_split": 0.1})
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file,
                      data={"streaming": True, "validation_split": 10, "token_budget": 64 * 4 * 7 + 1},
                      training={"max_steps": -1})
    assert train_module.training_arguments(cfg).max_steps == 8  # ceil(budget / (64 tokens x 4 blocks))


@pytest.mark.slow
def test_streaming_resume_continues_where_the_stream_stopped(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    seen: list[list[int]] = []
    original_step = train_module.IgeaTrainer.training_step

    def recording_step(self, model, inputs, num_items_in_batch=None):
        seen.extend(inputs["input_ids"].tolist())
        return original_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(train_module.IgeaTrainer, "training_step", recording_step)
    whole = train_module.train(streaming_config(tmp_path / "whole", tiny_model_dir, corpus_file))
    uninterrupted, seen[:] = list(seen), []

    cfg = streaming_config(tmp_path / "cut", tiny_model_dir, corpus_file)
    train_until_first_checkpoint(cfg, monkeypatch)
    first_part, seen[:] = list(seen), []
    resumed = train_module.train(cfg, resume=True)

    assert len(first_part) == len(seen) == len(uninterrupted) // 2
    assert first_part + seen == uninterrupted  # nothing seen twice, nothing skipped, same order
    assert resumed.metrics["after"]["eval_loss"] == pytest.approx(whole.metrics["after"]["eval_loss"], abs=1e-6)


def two_sources(corpus_file, weights=(0.9, 0.1)):
    return [{"path": str(corpus_file), "weight": weights[0]}, {"path": sample_corpus_path(), "weight": weights[1]}]


@pytest.mark.parametrize("streaming", [False, True])
def test_mixing_follows_the_weights_within_two_points(tiny_model_dir, corpus_file, tmp_path, streaming):
    data = {"sources": two_sources(corpus_file), "path": None, "block_size": 16, "validation_split": 0}
    if streaming:
        data.update(streaming=True, shuffle_buffer=32)
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data=data)
    train = prepare_dataset(cfg, load_tokenizer(cfg)).train
    sources = [row["source"] for _, row in zip(range(3000), train, strict=False)]
    counts = Counter(sources)
    assert len(sources) == 3000
    assert counts[0] / len(sources) == pytest.approx(0.9, abs=0.02)
    assert counts[1] / len(sources) == pytest.approx(0.1, abs=0.02)


def test_a_mixed_run_reports_the_tokens_each_source_supplied(tiny_model_dir, corpus_file, tmp_path):
    data = {"sources": two_sources(corpus_file, (0.5, 0.5)), "path": None, "validation_split": 0.05}
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data=data, training={"max_steps": 6})
    result = train_module.train(cfg)
    seen = result.metrics["data"]["tokens_seen"]
    assert set(seen) == {"abstracts.txt", "sample_corpus.txt"}
    assert sum(seen.values()) == 6 * 4 * 64 and min(seen.values()) > 0
    assert result.metrics["data"]["train"]["sources"]["sample_corpus.txt"]["blocks"] > 0


def test_source_weights_must_be_positive(tiny_model_dir, corpus_file, tmp_path):
    data = {"sources": two_sources(corpus_file, (1.0, 0.0)), "path": None}
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight: 0.0 is not allowed"):
        make_config(tmp_path, tiny_model_dir, corpus_file, data=data)


def test_collator_counts_sources_but_never_feeds_them_to_the_model():
    batch = train_module.BlockCollator()([{"input_ids": [1, 2, 3], "source": 1}, {"input_ids": [4, 5, 6], "source": 0}])
    assert batch["source"].tolist() == [1, 0] and torch.equal(batch["labels"], batch["input_ids"])


@pytest.mark.slow
def test_streaming_memory_benchmark_runs_in_its_quick_form():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_streaming_memory.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ratio 10x / 1x:" in done.stdout


def test_tokens_seen_per_source_survive_a_resume(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    data = {"sources": two_sources(corpus_file, (0.5, 0.5)), "path": None, "validation_split": 0.05}
    steps = {"max_steps": 6, "save_steps": 3}
    whole = train_module.train(make_config(tmp_path / "whole", tiny_model_dir, corpus_file, data=data, training=steps))
    cfg = make_config(tmp_path / "cut", tiny_model_dir, corpus_file, data=data, training=steps)
    train_until_first_checkpoint(cfg, monkeypatch)
    resumed = train_module.train(cfg, resume=True)
    assert resumed.metrics["data"]["tokens_seen"] == whole.metrics["data"]["tokens_seen"]


def test_streamed_blocks_are_reshuffled_every_epoch(tiny_model_dir, corpus_file, tmp_path):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file,
                      data={"streaming": True, "validation_split": 0, "shuffle_buffer": 50, "block_size": 32},
                      training={"max_steps": 5})
    train = prepare_dataset(cfg, load_tokenizer(cfg)).train
    first = [row["input_ids"] for _, row in zip(range(40), train, strict=False)]
    assert [row["input_ids"] for _, row in zip(range(40), train, strict=False)] == first  # same epoch, same order
    train.set_epoch(1)
    assert [row["input_ids"] for _, row in zip(range(40), train, strict=False)] != first
