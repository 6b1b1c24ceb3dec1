"""Mixtures that mean what they say: `data.mix` decides what an epoch of weighted sources is, the counts are exact,
shares follow the weights in any window of the training stream, and what each source gave is reported."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

import igea
from igea.arguments import training_arguments
from igea.basemodel import load_tokenizer
from igea.blockstore import document_ids
from igea.cli import main
from igea.config import GENERAL_TEXT, ConfigError, sample_corpus_path, shipped_corpus_path
from igea.data import mixture_plan, prepare_dataset, report_mixture_plan
from igea.errors import IgeaError
from igea.train import report_mixture
from igea.trainer import build_trainer

from conftest import make_config, train_until_first_checkpoint, write_config

BLOCK = 64


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """The demo's sample corpus cut in two halves by documents (as the issue's user did)."""
    lines = [line for line in Path(sample_corpus_path()).read_text(encoding="utf-8").splitlines() if line.strip()]
    folder = tmp_path_factory.mktemp("halves")
    first, second = folder / "first.txt", folder / "second.txt"
    first.write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    second.write_text("\n".join(lines[200:]) + "\n", encoding="utf-8")
    return first, second


def mixture(tmp_path, model_dir, halves, weights, **data):
    sources = [{"path": str(halves[0]), "weight": weights[0], "label": "domain"},
               {"path": str(halves[1]), "weight": weights[1], "label": "general"}]
    cfg = make_config(tmp_path, model_dir, halves[0], data={"path": None, "sources": sources, "validation_split": 0,
                                                             "block_size": BLOCK, **data})
    return cfg, prepare_dataset(cfg, load_tokenizer(cfg))


def composition(train) -> dict[int, Counter]:
    """How often each block (by its token ids) of each source appears in one epoch of the mixture."""
    seen: dict[int, Counter] = {0: Counter(), 1: Counter()}
    for row in train:
        seen[row["source"]][tuple(row["input_ids"])] += 1
    return seen


@pytest.mark.parametrize("weights", [(0.2, 0.8), (0.5, 0.5), (0.8, 0.2)])
def test_primary_an_epoch_is_one_pass_over_the_first_source_and_the_others_start_over(tiny_model_dir, halves,
                                                                                     tmp_path, weights):
    cfg, data = mixture(tmp_path, tiny_model_dir, halves, weights)
    sources = data.stats["train"]["sources"]
    n0, n1 = sources["domain"]["blocks"], sources["general"]["blocks"]
    seen = composition(data.train)
    assert sorted(seen[0].values()) == [1] * n0  # every block of the first source exactly once
    drawn = round(n0 / weights[0] * weights[1])
    assert sum(seen[1].values()) == drawn == sources["general"]["drawn"]
    full, rest = divmod(drawn, n1)
    assert len(seen[1]) == min(drawn, n1)  # a repeated source: every block; a subsampled one: distinct blocks
    assert set(seen[1].values()) <= {full, full + 1}  # passes over it, each block at most once more than another
    assert sources["general"]["passes"] == pytest.approx(drawn / n1)
    assert len(data.train) == n0 + drawn == data.stats["train"]["blocks"]
    assert data.stats["train"]["mix"] == "primary"


def test_first_exhausted_repeats_nothing_and_all_exhausted_sees_everything(tiny_model_dir, halves, tmp_path):
    _, first = mixture(tmp_path / "first", tiny_model_dir, halves, (0.5, 0.5), mix="first_exhausted")
    _, every = mixture(tmp_path / "all", tiny_model_dir, halves, (0.5, 0.5), mix="all_exhausted")
    sizes = [first.stats["train"]["sources"][name]["blocks"] for name in ("domain", "general")]
    shortest = min(sizes)
    seen = composition(first.train)
    assert all(set(c.values()) == {1} for c in seen.values())
    assert [sum(c.values()) for c in seen.values()] == [shortest, shortest]
    seen = composition(every.train)
    assert [len(c) for c in seen.values()] == sizes  # every block of every source
    assert [sum(c.values()) for c in seen.values()] == [max(sizes)] * 2


def test_a_token_budget_sizes_the_mixture(tiny_model_dir, halves, tmp_path):
    budget = 100_000
    _, data = mixture(tmp_path, tiny_model_dir, halves, (0.9, 0.1), token_budget=budget)
    blocks = math.ceil(budget / BLOCK)
    counts = Counter(data.train["source"])
    assert counts[0] + counts[1] == pytest.approx(blocks, abs=1) and counts[1] == round(blocks * 0.1)
    assert data.stats["train"]["mix"] == "token_budget"


def test_shares_in_every_window_of_the_training_stream_follow_the_weights(tiny_model_dir, halves, tmp_path):
    """The sources as the Trainer feeds them (its own shuffle included): every window of 64 blocks holds the
    second source within 4 standard deviations of a binomial draw at its weight."""
    cfg, data = mixture(tmp_path, tiny_model_dir, halves, (0.7, 0.3))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = build_trainer(cfg, training_arguments(cfg), model, load_tokenizer(cfg), data)
    order = [int(s) for batch in trainer.get_train_dataloader() for s in batch["source"]]
    assert len(order) == len(data.train)
    window, p = 64, 0.3
    bound = 4 * math.sqrt(window * p * (1 - p))
    counts = np.convolve(np.asarray(order) == 1, np.ones(window, dtype=int), mode="valid")
    assert len(counts) > 100 and np.abs(counts - window * p).max() <= bound


def test_streamed_shares_follow_the_weights_and_the_first_source_is_read_through(tiny_model_dir, halves, tmp_path):
    _, blocks = mixture(tmp_path / "map", tiny_model_dir, halves, (0.5, 0.5))
    n0, n1 = (blocks.stats["train"]["sources"][name]["blocks"] for name in ("domain", "general"))
    _, data = mixture(tmp_path, tiny_model_dir, halves, (0.5, 0.5), streaming=True, shuffle_buffer=16)
    stream = data.train
    rows = list(islice(stream, 3000))
    window, p = 64, 0.5
    counts = np.convolve(np.asarray([r["source"] for r in rows]) == 1, np.ones(window, dtype=int), mode="valid")
    assert np.abs(counts - window * p).max() <= 4 * math.sqrt(window * p * (1 - p))
    first_epoch = rows[: round(2 * n0 * 0.9)]  # well inside the first epoch: the first source is not through yet
    assert json.loads(json.dumps(stream.position_after(len(first_epoch))))["epoch"] == 0
    domain = [tuple(r["input_ids"]) for r in first_epoch if r["source"] == 0]
    general = [tuple(r["input_ids"]) for r in first_epoch if r["source"] == 1]
    assert len(set(domain)) == len(domain)  # no block of the first source twice in its epoch
    assert len(general) > n1 and len(set(general)) == n1  # the shorter source started over, the epoch went on
    assert stream.position_after(len(first_epoch))["sources"][1]["passes"] >= 1


def test_a_mixture_that_leaves_out_or_repeats_a_source_says_so(tiny_model_dir, halves, tmp_path, caplog):
    _, mostly_domain = mixture(tmp_path / "a", tiny_model_dir, halves, (0.8, 0.2))
    _, mostly_general = mixture(tmp_path / "b", tiny_model_dir, halves, (0.2, 0.8))
    with caplog.at_level("INFO", logger="igea.data"):
        report_mixture_plan(mostly_domain.stats["train"], len(mostly_domain.train))  # one epoch
        report_mixture_plan(mostly_general.stats["train"], 3 * len(mostly_general.train))  # three epochs
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    plan = mixture_plan(mostly_domain.stats["train"], len(mostly_domain.train))["general"]
    drawn = mostly_domain.stats["train"]["sources"]["general"]["drawn"]
    assert warnings[0] == (f"data.sources: 'general' would be trained on only {drawn:,} of its {plan['blocks']:,} "
                           f"blocks ({100 * drawn / plan['blocks']:.3g}%): an epoch of the mixture (data.mix: primary) "
                           f"draws {drawn:,} of them by its weight 0.2; raise its weight, or set data.mix: "
                           "all_exhausted to see every block of every source")
    repeated = mixture_plan(mostly_general.stats["train"], 3 * len(mostly_general.train))["general"]
    assert repeated["passes"] > 4 and warnings[1].startswith(
        f"data.sources: each block of 'general' would be trained on {repeated['passes']:.1f} times")
    assert len(warnings) == 2


def test_weights_that_do_not_add_up_to_1_are_stated_as_the_shares_they_are(tiny_model_dir, halves, tmp_path,
                                                                            caplog):
    cfg, data = mixture(tmp_path, tiny_model_dir, halves, (0.9, 0.3))
    with caplog.at_level("INFO", logger="igea.data"):
        report_mixture(cfg, data, training_arguments(cfg))
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == ("data.sources: the weights (0.9, 0.3) add up to 1.2, not 1: they are read as shares of the "
                       "mixture, domain 0.75, general 0.25")
    assert said[1].startswith("mixture (primary): domain (weight 0.75) ") and "; general (weight 0.25) " in said[1]
    caplog.clear()
    cfg, data = mixture(tmp_path / "one", tiny_model_dir, halves, (0.75, 0.25))
    with caplog.at_level("INFO", logger="igea.data"):
        report_mixture(cfg, data, training_arguments(cfg))
    assert not any("add up to" in r.getMessage() for r in caplog.records)  # nothing to say when they add up to 1


def test_a_step_limited_run_is_told_about_its_steps_with_a_meaningful_share(tiny_model_dir, halves, tmp_path,
                                                                           caplog):
    """The primary source of a run that max_steps cuts short: the advice is the steps, not its weight, and a few
    blocks of many read as a share with three figures (not 'only 0%')."""
    cfg, data = mixture(tmp_path, tiny_model_dir, halves, (0.9, 0.1))
    train = data.stats["train"]
    with caplog.at_level("WARNING", logger="igea.data"):
        report_mixture_plan(train, 2 * 4, max_steps=2)  # 2 steps of 4 blocks
    domain = mixture_plan(train, 2 * 4)["domain"]
    seen, blocks = max(1, round(domain["seen"] * domain["blocks"])), domain["blocks"]
    steps = math.ceil(blocks * train["blocks"] / (train["sources"]["domain"]["drawn"] * 4))
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings[0] == (f"data.sources: 'domain' would be trained on only {seen} of its {blocks:,} blocks "
                           f"({100 * seen / blocks:.3g}%): training.max_steps (2) ends the run first: about "
                           f"{steps:,} steps would see each of its blocks once")
    assert 0 < 100 * seen / blocks < 1 and "(0%)" not in warnings[0]


def test_igea_prepare_says_what_igea_train_says_about_the_mixture(tiny_model_dir, halves, tmp_path, caplog):
    sources = [{"path": str(halves[0]), "weight": 0.2, "label": "domain"},
               {"path": str(halves[1]), "weight": 0.8, "label": "general"}]
    config = write_config(tmp_path, "mix", tiny_model_dir, halves[0], max_steps=600,
                          data={"path": None, "sources": sources, "validation_split": 0, "block_size": BLOCK})
    with caplog.at_level("INFO", logger="igea.data"):
        assert main(["prepare", str(config)]) == 0
    said = [r.getMessage() for r in caplog.records]
    cfg, data = mixture(tmp_path / "direct", tiny_model_dir, halves, (0.2, 0.8))
    plan = mixture_plan(data.stats["train"], 600 * 4)
    assert f"mixture (primary): domain (weight 0.2) {plan['domain']['blocks']:,} blocks" in "\n".join(said)
    assert any(line.startswith("data.sources: 'domain' would be trained on only ") for line in said)
    assert any(line.startswith("data.sources: each block of 'general' would be trained on "
                               f"{plan['general']['passes']:.1f} times") and "training.max_steps (600)" in line
               for line in said)


@pytest.mark.slow
def test_a_resumed_run_does_not_warn_again(tiny_model_dir, halves, tmp_path, monkeypatch, caplog):
    sources = [{"path": str(halves[0]), "weight": 0.5, "label": "domain"},
               {"path": str(halves[1]), "weight": 0.5, "label": "general"}]
    cfg = make_config(tmp_path, tiny_model_dir, halves[0], training={"max_steps": 4, "save_steps": 2},
                      data={"path": None, "sources": sources, "validation_split": 0, "block_size": BLOCK})
    with caplog.at_level("INFO", logger="igea.data"):
        train_until_first_checkpoint(cfg, monkeypatch)
    assert any("would be trained on only" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("INFO", logger="igea.data"):
        igea.train(cfg, resume=True)
    said = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("mixture (primary): ") for line in said)  # what it takes, said again
    assert not any(r.levelname == "WARNING" for r in caplog.records)  # the advice was given once, at the start


def test_a_mixed_run_reports_blocks_available_used_and_passes(tiny_model_dir, halves, tmp_path):
    sources = [{"path": str(halves[0]), "weight": 0.5, "label": "domain"},
               {"path": str(halves[1]), "weight": 0.5, "label": "general"}]
    cfg = make_config(tmp_path, tiny_model_dir, halves[0], training={"max_steps": 8, "eval_steps": 8,
                                                                      "save_steps": 8},
                      data={"path": None, "sources": sources, "validation_split": 0, "block_size": BLOCK})
    result = igea.run(cfg)
    used = result.metrics["data"]["mixture"]
    assert sum(u["used"] for u in used.values()) == 8 * 4
    for name, u in used.items():
        assert u["used"] == result.metrics["data"]["tokens_seen"][name] // BLOCK
        assert u["passes"] == pytest.approx(u["used"] / u["blocks"])
        assert u["blocks"] == result.metrics["data"]["train"]["sources"][name]["blocks"]
    card = (cfg.output_dir / "README.md").read_text(encoding="utf-8")
    g = used["general"]
    assert f"general: {g['blocks']:,} blocks, {g['used']:,} used, {g['passes']:.1f} passes" in card


# ----------------------------------------------------------------------------------------------------------
# Replay from a real general corpus: a hub corpus streamed and capped per source, tested on local parquet files of
# its shape (CulturaX: `text`, `timestamp`, `url`, `source`, in several files)


@pytest.fixture(scope="module")
def hub_shaped(tmp_path_factory) -> tuple[Path, list[str]]:
    """Everyday Italian in three parquet files shaped like a CulturaX language folder, and its texts in order."""
    texts = Path(shipped_corpus_path(GENERAL_TEXT)).read_text(encoding="utf-8").splitlines()
    folder = tmp_path_factory.mktemp("culturax") / "it"
    folder.mkdir()
    for part, start in enumerate(range(0, len(texts), 28)):
        rows = texts[start:start + 28]
        pq.write_table(pa.table({
            "text": rows,
            "timestamp": [f"2019/05/{10 + i % 20:02d} 10:12:57" for i in range(len(rows))],
            "url": [f"https://example.org/{part}/{i}" for i in range(len(rows))],
            "source": ["mC4" if i % 2 else "OSCAR-2019" for i in range(len(rows))],
        }), folder / f"it_part_{part:05d}.parquet")
    return folder, texts


def replay_mixture(tmp_path, model_dir, domain, folder, replay, weights=(0.9, 0.1), **data):
    sources = [{"path": str(domain), "weight": weights[0], "label": "biomed"},
               {"path": str(folder / "*.parquet"), "weight": weights[1], "text_column": "text", "label": "general",
                **replay}]
    cfg = make_config(tmp_path, model_dir, domain, data={"path": None, "sources": sources, "validation_split": 0,
                                                          "block_size": BLOCK, **data})
    return cfg, prepare_dataset(cfg, load_tokenizer(cfg))


def replay_ids(cfg, texts) -> tuple[np.ndarray, np.ndarray]:
    """The replay corpus as the run tokenizes it: each document's token count, and all ids in order."""
    ids = document_ids(load_tokenizer(cfg), texts, cfg.data.document_boundary)
    return np.array([len(i) for i in ids]), np.concatenate([np.asarray(i) for i in ids])


def blocks_of(ids: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(t) for t in ids[i:i + BLOCK]) for i in range(0, len(ids) - BLOCK + 1, BLOCK)}


def test_replay_from_hub_shaped_parquet_reads_whole_documents_up_to_its_token_cap(tiny_model_dir, halves, hub_shaped,
                                                                                  tmp_path):
    folder, texts = hub_shaped
    cfg, data = replay_mixture(tmp_path, tiny_model_dir, halves[0], folder, {"max_tokens": 3000})
    lengths, ids = replay_ids(cfg, texts)
    assert lengths.sum() > 3 * 3000  # the corpus is much larger than the cap
    documents = int(np.searchsorted(np.cumsum(lengths), 3000, side="right"))  # whole documents within the cap
    tokens = int(lengths[:documents].sum())
    general = data.stats["train"]["sources"]["general"]
    assert (general["documents"], general["tokens"], general["blocks"]) == (documents, tokens, tokens // BLOCK)
    assert tokens <= 3000
    seen = composition(data.train)
    assert set(seen[1]) <= blocks_of(ids[:tokens])  # only the first documents, in the files' order
    assert len(seen[1]) == general["blocks"]
    n0 = data.stats["train"]["sources"]["biomed"]["blocks"]
    assert sum(seen[0].values()) == n0 and sum(seen[1].values()) == round(n0 / 0.9 * 0.1) == general["drawn"]
    _, more = replay_mixture(tmp_path / "more", tiny_model_dir, halves[0], folder, {"max_tokens": 6000})
    assert 3000 < more.stats["train"]["sources"]["general"]["tokens"] <= 6000  # another cap: other blocks


def test_replay_capped_in_documents_holds_out_its_share_from_them(tiny_model_dir, halves, hub_shaped, tmp_path):
    folder, texts = hub_shaped
    cfg, data = replay_mixture(tmp_path, tiny_model_dir, halves[0], folder, {"max_documents": 20},
                               validation_split=2)
    sets = data.stats["validation_sets"]
    assert data.stats["train"]["sources"]["general"]["documents"] == 18 and sets["general"]["documents"] == 2
    assert sets["biomed"]["documents"] == 2 and data.stats["train"]["sources"]["biomed"]["documents"] == 198
    lengths, _ = replay_ids(cfg, texts)
    train_tokens = data.stats["train"]["sources"]["general"]["tokens"]
    assert train_tokens + sets["general"]["tokens"] == lengths[:20].sum()  # the first 20 documents, no other


def test_a_token_capped_read_shows_its_progress_in_the_caps_tokens(tiny_model_dir, halves, hub_shaped, tmp_path,
                                                                   caplog, monkeypatch):
    """A corpus read up to max_tokens counts its progress in the cap's tokens: its own documents, most of them never
    read, would give a percent that stops short and an ETA far too long. An uncapped source counts documents."""
    monkeypatch.setattr("igea.progress.PROGRESS_SECONDS", 0.0)  # a line at each update
    folder, _ = hub_shaped
    with caplog.at_level("INFO", logger="igea"):
        replay_mixture(tmp_path, tiny_model_dir, halves[0], folder, {"max_tokens": 3000},
                       cache_dir=str(tmp_path / "cache"))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("igea")]
    capped = [line for line in lines if line.startswith("tokenizing within data.sources[1].max_tokens: ")]
    assert capped and all(re.fullmatch(r"tokenizing within data\.sources\[1\]\.max_tokens: \d+% \([\d,]+/3,000 "
                                       r"tokens\) \| .*, ETA .*", line) for line in capped), capped
    assert not any(line.startswith("general: reading: ") for line in lines)
    assert any(line.startswith("biomed: reading: ") for line in lines)


def test_a_token_cap_below_the_first_document_is_one_error_naming_it(tiny_model_dir, halves, hub_shaped, tmp_path):
    """A cap that holds no whole document would leave the source empty (and the error would blame the held-out
    split): one error names the source's max_tokens and the first document's length."""
    folder, texts = hub_shaped
    with pytest.raises(IgeaError) as caught:
        replay_mixture(tmp_path, tiny_model_dir, halves[0], folder, {"max_tokens": BLOCK}, validation_split=1)
    cfg = make_config(tmp_path, tiny_model_dir, halves[0])
    first = int(replay_ids(cfg, texts[:1])[0][0])
    assert first > BLOCK
    assert str(caught.value) == (f"data.sources[1].max_tokens: {BLOCK} holds no whole document: the corpus' first "
                                 f"has {first} tokens; raise it (it keeps the first whole documents within the cap)")


def test_streamed_replay_starts_over_at_its_token_cap_and_keeps_its_weight(tiny_model_dir, halves, hub_shaped,
                                                                           tmp_path, caplog):
    folder, texts = hub_shaped
    with caplog.at_level("INFO", logger="igea.data"):
        cfg, data = replay_mixture(tmp_path, tiny_model_dir, halves[0], folder, {"max_tokens": 1000},
                                   weights=(0.7, 0.3), streaming=True, shuffle_buffer=8)
    assert [r.getMessage() for r in caplog.records if "streamed in passes" in r.getMessage()] == [
        f"general: streamed in passes of its first {1000 // BLOCK} blocks (max_tokens 1,000 // data.block_size "
        f"{BLOCK}), each pass in a new order"]  # the cap is said once, for the capped source only
    rows = list(islice(data.train, 600))
    general = [tuple(r["input_ids"]) for r in rows if r["source"] == 1]
    _, ids = replay_ids(cfg, texts)
    assert set(general) == blocks_of(ids[:1000 // BLOCK * BLOCK])  # the first 15 blocks, nothing after them
    assert len(general) > 5 * 15  # drawn pass after pass
    p, n = 0.3, len(rows)
    assert abs(len(general) - n * p) <= 4 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize(("source", "message"), [
    ({"max_tokens": 10}, "data.sources[1].max_tokens: 10 is not allowed; it must be at least data.block_size (64)"),
    ({"max_documents": 0}, "data.sources[1].max_documents: 0 is not allowed; it must be at least 1"),
    ({"max_tokens": "lots"}, "data.sources[1].max_tokens: expected an integer or null, got 'lots'"),
    ({"max_token": 5000}, "unknown key 'data.sources[1].max_token'; did you mean 'max_tokens'"),
])
def test_per_source_caps_are_checked_at_load(tiny_model_dir, halves, tmp_path, source, message):
    sources = [{"path": str(halves[0])}, {"path": str(halves[1]), **source}]
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, tiny_model_dir, halves[0], data={"path": None, "sources": sources})
    assert str(caught.value).startswith(message), str(caught.value)
