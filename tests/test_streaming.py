"""Streaming corpora (on-the-fly packing, windowed shuffle, resume from a saved position) and weighted mixing."""

from __future__ import annotations

import importlib
import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from igea.arguments import training_arguments
from igea.basemodel import load_tokenizer
from igea.config import ConfigError, sample_corpus_path
from igea.data import BlockCollator, prepare_dataset
from igea.errors import IgeaError
from igea.streaming import STATE_FILE, BlockStream

from conftest import make_config, train_until_first_checkpoint

train_module = importlib.import_module("igea.train")
trainer_module = importlib.import_module("igea.trainer")
streaming_module = importlib.import_module("igea.streaming")


def streaming_config(tmp_path, model_dir, corpus, **training):
    return make_config(
        tmp_path, model_dir, corpus,
        data={"streaming": True, "validation_split": 20, "shuffle_buffer": 64},
        training={"max_steps": 10, "save_steps": 5, "eval_steps": 10, "logging_steps": 5, **training},
    )


@pytest.mark.parametrize("packing", ["blocks", "documents"])
def test_a_stream_packs_the_same_blocks_as_the_map_style_pipeline(tiny_model_dir, corpus_file, tmp_path, packing):
    common = {"validation_split": 0, "block_size": 32, "packing": packing}
    mapped = make_config(tmp_path, tiny_model_dir, corpus_file, data=common)
    streamed = make_config(tmp_path, tiny_model_dir, corpus_file,
                           data={**common, "streaming": True, "shuffle_buffer": 1}, training={"max_steps": 5})
    tokenizer = load_tokenizer(mapped)
    expected = prepare_dataset(mapped, tokenizer).train
    got = list(islice(prepare_dataset(streamed, tokenizer).train, len(expected) + 1))
    for column in expected.column_names:
        assert [row[column] for row in got[:-1]] == [list(r) for r in expected[column]]
    assert got[-1]["input_ids"] == list(expected["input_ids"][0])  # the stream goes on with the next epoch


def test_streaming_needs_steps_or_a_token_budget_and_a_validation_count(tiny_model_dir, corpus_file, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of training.max_steps and data.token_budget"):
        make_config(tmp_path, tiny_model_dir, corpus_file, data={"streaming": True, "validation_split": 10},
                    training={"max_steps": -1})
    with pytest.raises(ConfigError, match="is a fraction, which a streamed corpus cannot take"):
        make_config(tmp_path, tiny_model_dir, corpus_file, data={"streaming": True, "validation_split": 0.1})
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file,
                      data={"streaming": True, "validation_split": 10, "token_budget": 64 * 4 * 7 + 1},
                      training={"max_steps": -1})
    assert training_arguments(cfg).max_steps == 8  # ceil(budget / (64 tokens x 4 blocks))
    with pytest.raises(ConfigError, match="dataloader_num_workers: 2 is not allowed with data.streaming"):
        make_config(tmp_path, tiny_model_dir, corpus_file, data={"streaming": True, "validation_split": 10},
                    training={"dataloader_num_workers": 2})


@pytest.mark.slow
def test_streaming_resume_continues_where_the_stream_stopped(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    seen: list[list[int]] = []
    original_step = trainer_module.IgeaTrainer.training_step

    def recording_step(self, model, inputs, num_items_in_batch=None):
        seen.extend(inputs["input_ids"].tolist())
        return original_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(trainer_module.IgeaTrainer, "training_step", recording_step)
    whole = train_module.train(streaming_config(tmp_path / "whole", tiny_model_dir, corpus_file))
    uninterrupted, seen[:] = list(seen), []

    cfg = streaming_config(tmp_path / "cut", tiny_model_dir, corpus_file)
    train_until_first_checkpoint(cfg, monkeypatch)
    first_part, seen[:] = list(seen), []
    handed_out = count_blocks_handed_out(monkeypatch)
    resumed = train_module.train(cfg, resume=True)

    assert len(first_part) == len(seen) == len(uninterrupted) // 2
    assert first_part + seen == uninterrupted  # nothing seen twice, nothing skipped, same order
    assert resumed.metrics["after"]["eval_loss"] == pytest.approx(whole.metrics["after"]["eval_loss"], abs=1e-6)
    saved = json.loads((cfg.output_dir / "checkpoint-5" / STATE_FILE).read_text())
    assert saved["blocks"] == len(first_part)
    # the resumed stream started at the saved position: it handed out the blocks trained after it, plus the
    # few the loaders read ahead, and none of the 20 before it (a replay hands those out again)
    assert len(seen) <= handed_out[0] < len(seen) + len(first_part)


def count_blocks_handed_out(monkeypatch) -> list[int]:
    count = [0]
    original = BlockStream.__iter__

    def counting(self):
        for block in original(self):
            count[0] += 1
            yield block

    monkeypatch.setattr(BlockStream, "__iter__", counting)
    return count


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
    assert set(seen) == {"abstracts", "sample_corpus"}
    assert sum(seen.values()) == 6 * 4 * 64 and min(seen.values()) > 0
    assert result.metrics["data"]["train"]["sources"]["sample_corpus"]["blocks"] > 0


def test_source_weights_must_be_positive(tiny_model_dir, corpus_file, tmp_path):
    data = {"sources": two_sources(corpus_file, (1.0, 0.0)), "path": None}
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight: 0.0 is not allowed"):
        make_config(tmp_path, tiny_model_dir, corpus_file, data=data)


def test_collator_counts_sources_but_never_feeds_them_to_the_model():
    batch = BlockCollator()([{"input_ids": [1, 2, 3], "source": 1}, {"input_ids": [4, 5, 6], "source": 0}])
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


@pytest.mark.parametrize("streaming", [False, True])
def test_tokens_seen_per_source_survive_a_resume(tiny_model_dir, corpus_file, tmp_path, monkeypatch, streaming):
    data = {"sources": two_sources(corpus_file, (0.5, 0.5)), "path": None, "validation_split": 0.05}
    if streaming:
        data.update(streaming=True, validation_split=20, shuffle_buffer=16)
    steps = {"max_steps": 6, "save_steps": 3}
    whole = train_module.train(make_config(tmp_path / "whole", tiny_model_dir, corpus_file, data=data, training=steps))
    cfg = make_config(tmp_path / "cut", tiny_model_dir, corpus_file, data=data, training=steps)
    train_until_first_checkpoint(cfg, monkeypatch)
    resumed = train_module.train(cfg, resume=True)
    assert resumed.metrics["data"]["tokens_seen"] == whole.metrics["data"]["tokens_seen"]


def test_streamed_blocks_are_reshuffled_every_epoch(tiny_model_dir, corpus_file, tmp_path):
    data = {"validation_split": 0, "block_size": 32, "max_documents": 30}
    mapped = make_config(tmp_path, tiny_model_dir, corpus_file, data=data)
    in_order = prepare_dataset(mapped, load_tokenizer(mapped)).train["input_ids"]
    blocks = len(in_order)
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data={**data, "streaming": True, "shuffle_buffer": 50},
                      training={"max_steps": 5})
    train = prepare_dataset(cfg, load_tokenizer(cfg)).train
    two_epochs = [row["input_ids"] for row in islice(train, 2 * blocks)]
    first, second = two_epochs[:blocks], two_epochs[blocks:]
    assert [row["input_ids"] for row in islice(train, blocks)] == first  # the same stream, the same order
    assert second != first and sorted(second) == sorted(first)  # each epoch: every block once, in a new order
    window = [list(r) for r in in_order[:50]]
    assert first[:50] != window and sorted(first[:50]) == sorted(window)  # shuffled within windows of 50 blocks


def stream_of(tmp_path, model_dir, corpus, **data):
    cfg = make_config(tmp_path, model_dir, corpus, training={"max_steps": 5},
                      data={"streaming": True, "validation_split": 5, "block_size": 32, **data})
    return lambda: prepare_dataset(cfg, load_tokenizer(cfg)).train


@pytest.mark.parametrize(("packing", "mix"), [("blocks", "primary"), ("documents", "first_exhausted")])
def test_a_stream_resumes_exactly_from_any_block(tiny_model_dir, corpus_file, tmp_path, monkeypatch, packing, mix):
    monkeypatch.setattr(streaming_module, "DOCUMENT_BATCH", 8)
    sources = two_sources(corpus_file, (0.7, 0.3))
    make = stream_of(tmp_path, tiny_model_dir, corpus_file, sources=sources, path=None, shuffle_buffer=40,
                     packing=packing, mix=mix)
    stream = make()
    # past the point where the short source runs out: it starts over (primary) or ends the epoch
    reference = list(islice(stream, 9000))
    for k in (0, 39, 40, 41, 1234, 6000, 8500):
        reading = iter(stream)
        next(islice(reading, k + 7, None))  # the loaders read ahead of the trained blocks
        state = json.loads(json.dumps(stream.position_after(k)))  # what a checkpoint holds
        resumed = make()
        resumed.load_position(state)
        assert list(islice(resumed, 200)) == reference[k:k + 200], k
    if mix == "primary":
        assert state["epoch"] == 0 and state["sources"][1]["passes"] >= 1
    else:
        assert state["epoch"] >= 1


def test_a_capped_source_starts_over_at_its_cap_and_resumes_exactly(tiny_model_dir, corpus_file, tmp_path,
                                                                    monkeypatch):
    """`data.sources[].max_tokens` on a stream: 50 blocks of the source per pass (a shuffle window of 40 and one of
    10), resumable from any block, and a checkpoint taken under another cap is refused."""
    monkeypatch.setattr(streaming_module, "DOCUMENT_BATCH", 8)
    sources = two_sources(corpus_file, (0.7, 0.3))
    sources[1]["max_tokens"] = 50 * 32 + 7
    make = stream_of(tmp_path, tiny_model_dir, corpus_file, sources=sources, path=None, shuffle_buffer=40)
    stream = make()
    reference = list(islice(stream, 2000))
    capped = [tuple(r["input_ids"]) for r in reference if r["source"] == 1]
    assert len(set(capped)) == 50 and len(capped) > 8 * 50
    for k in (0, 41, 170, 1500):
        reading = iter(stream)
        next(islice(reading, k + 7, None))
        state = json.loads(json.dumps(stream.position_after(k)))
        resumed = make()
        resumed.load_position(state)
        assert list(islice(resumed, 200)) == reference[k:k + 200], k
    sources[1]["max_tokens"] = 60 * 32
    other = stream_of(tmp_path, tiny_model_dir, corpus_file, sources=sources, path=None, shuffle_buffer=40)()
    with pytest.raises(IgeaError, match=r"max_tokens: \[None, 1607\] -> \[None, 1920\]"):
        other.load_position(state)


def test_resuming_late_reads_no_more_than_resuming_early(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming_module, "DOCUMENT_BATCH", 8)
    tokenized: list[str] = []
    original = streaming_module.document_ids

    def counting(tokenizer, texts, boundary):
        tokenized.extend(texts)
        return original(tokenizer, texts, boundary)

    monkeypatch.setattr(streaming_module, "document_ids", counting)
    make = stream_of(tmp_path, tiny_model_dir, corpus_file, shuffle_buffer=16)
    stream = make()
    costs = {}
    for k in (20, 4000):
        next(islice(stream, k, None))
        read_from_start = len(tokenized)
        state = stream.position_after(k)
        resumed = make()
        resumed.load_position(state)
        tokenized.clear()
        next(iter(resumed))
        costs[k] = len(tokenized)
        tokenized.clear()
        assert costs[k] <= 2 * streaming_module.DOCUMENT_BATCH  # one shuffle window of 16 blocks, one batch
    assert read_from_start > 10 * costs[4000]  # reaching block 4000 from the start read far more
    assert abs(costs[4000] - costs[20]) <= streaming_module.DOCUMENT_BATCH


def test_a_resume_with_other_data_settings_is_refused(tiny_model_dir, corpus_file, tmp_path):
    stream = stream_of(tmp_path, tiny_model_dir, corpus_file, shuffle_buffer=16)()
    next(islice(stream, 10, None))
    other = stream_of(tmp_path, tiny_model_dir, corpus_file, shuffle_buffer=32)()
    with pytest.raises(IgeaError, match=r"data settings changed since the checkpoint \(shuffle_buffer: 16 -> 32\)"):
        other.load_position(stream.position_after(10))


@pytest.mark.slow
def test_two_ranks_resume_a_stream_from_its_saved_position(tiny_model_dir, corpus_file, tmp_path):
    import shutil
    import subprocess
    import sys

    import yaml

    from conftest import config_dict

    accelerate = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu-2proc.yaml"

    def launch(name: str, *extra: str) -> subprocess.CompletedProcess:
        raw = config_dict(tmp_path / name, tiny_model_dir, corpus_file,
                          data={"streaming": True, "validation_split": 20, "shuffle_buffer": 16},
                          training={"max_steps": 10, "save_steps": 5, "eval_steps": 10, "total_train_batch_size": 8})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate),
                   "-m", "igea", "train", str(tmp_path / f"{name}.yaml"), *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    launch("whole")
    saved = json.loads((tmp_path / "whole" / "checkpoint-5" / STATE_FILE).read_text())
    assert saved["blocks"] == 5 * 8  # both ranks' blocks: one position serves the two
    shutil.copytree(tmp_path / "whole" / "checkpoint-5", tmp_path / "cut" / "checkpoint-5")
    resumed = launch("cut", "--resume")
    assert "stream resumes at block 40 (epoch 0) without replaying it" in resumed.stderr
    after = {name: json.loads((tmp_path / name / "metrics.json").read_text())["after"] for name in ("whole", "cut")}
    assert after["cut"]["eval_loss"] == pytest.approx(after["whole"]["eval_loss"], abs=1e-6)
