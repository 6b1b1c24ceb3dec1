"""The benchmark scripts in their short forms, so they keep running; their correctness checks must hold.

Speed is not asserted here (CI machines are shared and noisy); the scripts measure ratios, BENCHMARKS.md
records them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow
needs_shared_data = pytest.mark.skipif(not (SHARED_DATA / "train.jsonl").is_file(),
                                       reason=f"{SHARED_DATA} is not available")


def run_bench(script: str, *args: str) -> list[dict]:
    """Run bench/<script> with `args`; the JSON objects it printed, one a line."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"')]


@needs_shared_data
def test_pipeline_benchmark_yields_the_same_stream_without_padding():
    [result] = run_bench("bench_pipeline.py", "--quick")

    assert result["same_stream"] and result["igea_blocks_exact"] and result["run_clm_blocks_exact"]
    assert result["padding_tokens"] == 0
    assert 0 <= result["igea_dropped"] < result["block_size"]
    assert result["igea_dropped"] <= result["run_clm_dropped"]
    assert result["run_clm_tokens_per_s"] > 0 and result["igea_tokens_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["run_clm_s"] / result["igea_s"], rel=1e-2)


@needs_shared_data
def test_train_benchmark_trains_both_trainers_on_the_same_batches():
    [result] = run_bench("bench_train.py", "--quick")

    assert result["first_loss_plain"] == result["first_loss_igea"]
    assert result["plain_tokens_per_s"] > 0 and result["igea_tokens_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["igea_tokens_per_s"] / result["plain_tokens_per_s"], rel=1e-2)


@needs_shared_data
def test_vocab_benchmark_extends_a_general_tokenizer_and_trains_both_vocabularies():
    [result] = run_bench("bench_vocab.py", "--quick", "--documents-curve", "0,5")

    assert result["tokens_added"] == result["num_tokens"] == 100
    assert result["fertility_extended"] < result["fertility_base"]
    assert result["runs"]["extended"]["train_tokens"] < result["runs"]["base"]["train_tokens"]
    assert result["runs"]["extended"]["steps"] < result["runs"]["base"]["steps"]
    assert all(0 < v < 20 for v in [*result["bpb_untrained"].values(), *result["bpb_trained"].values()])
    assert result["add_tokens"]["plain"]["starting_inside_words"] > 0 == result["add_tokens"]["leading_space"][
        "starting_inside_words"]
    for name, points in result["curves"].items():  # scored untrained, then at each checkpoint to the end
        assert points[0]["step"] == 0 and points[0]["bpb"] == result["bpb_untrained"][name]
        assert points[-1]["step"] == result["runs"][name]["steps"]
        assert points[-1]["bpb"] == pytest.approx(result["bpb_trained"][name], rel=1e-6)
        assert [p["step"] for p in points] == sorted({p["step"] for p in points}) and len(points) >= 5
    assert result["bpb_untrained_penalty"] == pytest.approx(
        result["bpb_untrained"]["extended"] / result["bpb_untrained"]["base"] - 1)
    curve = result["documents_curve"]  # the penalty against the documents the new rows are fitted on
    assert curve["base"] == result["bpb_untrained"]["base"]
    assert [(p["fit_documents"], p["documents_read"]) for p in curve["points"]] == [(0, 0), (5, 5)]
    assert curve["points"][0]["fitted_tokens"] == 0 < curve["points"][1]["fitted_tokens"]
    assert all(p["penalty"] == pytest.approx(p["bpb"] / curve["base"] - 1) for p in curve["points"])


@needs_shared_data
def test_vocab_cost_benchmark_times_each_phase_of_igea_vocab(tmp_path):
    none, three = run_bench("bench_vocab_cost.py", "--quick", "--fit-documents", "0", "3", "--work", str(tmp_path))

    common = ["counting words", "learning merges", "model loaded", "extended tokenizer saved", "new rows ready",
              "extended model saved", "fertility measured", "bits per byte, extended model",
              "bits per byte, base model"]
    fit = ["the base model's reading", "the distillation"]
    assert set(common) <= set(none["phases_s"]) and not set(fit) & set(none["phases_s"])
    assert set(common + fit) <= set(three["phases_s"])
    assert none["fit"]["documents_read"] == none["fitted_tokens"] == 0 and none["distillation"] is None
    assert 0 < three["fit"]["documents_read"] <= 3 and three["distillation"]["steps"] == 1
    assert none["bits_per_byte"]["documents"] == three["bits_per_byte"]["documents"] == 10
    assert all(0 <= t <= r["wall_s"] for r in (none, three) for t in r["phases_s"].values())


def test_eval_benchmark_scores_the_same_blocks_as_run_clms_evaluation():
    [result] = run_bench("bench_eval.py", "--quick", "--load", "1")

    assert result["vocab_size"] == 32768 and result["same_loss"] and result["same_accuracy"]
    assert result["load"] == 1  # timed beside a neighbour process
    assert all(result[f"{side}_s"] > 0 for side in ("run_clm", "igea", "igea_eval", "igea_previous"))
    assert result["ratio"] == pytest.approx(result["run_clm_s"] / result["igea_s"], rel=1e-2)


def test_gpu_benchmark_smoke_test_runs_every_default_variant_on_cpu():
    results = {r["variant"]: r for r in run_bench("gpu_throughput.py", "--tiny")}

    assert set(results) == {"plain", "igea", "igea_documents"}
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in results.values())
    assert results["plain"]["bf16_autocast"] is False  # TrainingArguments' default
    assert results["igea"]["bf16_autocast"] is True  # configs/igea-1b.yaml's recipe
    assert results["igea_documents"]["packing"] == "documents"
    assert results["plain"]["params"] == results["igea"]["params"]


def test_lora_benchmark_trains_full_and_lora_on_the_same_model_and_batches():
    *variants, summary = run_bench("bench_lora.py", "--quick")
    full, lora = variants
    assert (full["variant"], lora["variant"]) == ("full", "lora")
    assert summary["lora_same_first_loss"]  # adapters start as the identity: same model, same batches
    assert lora["trainable_params"] < full["trainable_params"] == full["params"]
    assert lora["grads_mib"] < full["grads_mib"] and lora["optimizer_mib"] < full["optimizer_mib"]
    assert all(v["tokens_per_s"] > 0 and v["peak_rss_mib"] > 0 for v in variants)
    assert summary["lora_speed_ratio"] == pytest.approx(lora["tokens_per_s"] / full["tokens_per_s"], rel=1e-2)


def test_stream_resume_benchmark_resumes_from_the_saved_position_and_replays_without_it():
    [result] = run_bench("bench_stream_resume.py", "--quick")

    assert result["restored_from_saved_position"] and result["replayed_without_it"]
    for mode in ("saved_position_s", "replay_s", "stream_saved_position_s", "stream_replay_s"):
        assert set(result[mode]) == {str(result["early_step"]), str(result["late_step"])}
        assert all(seconds > 0 for seconds in result[mode].values())
    late, early = str(result["late_step"]), str(result["early_step"])
    assert result["ratio"] == pytest.approx(result["saved_position_s"][late] / result["saved_position_s"][early])
    assert result["corpus_tokens"] >= 2 * (result["late_step"] + 1) * result["batch"] * result["block"]


@needs_shared_data
def test_prepare_benchmark_tokenizes_once_into_exact_uint16_blocks():
    *runs, summary = run_bench("bench_prepare.py", "--quick")

    assert {(r["scale"], r["num_proc"]) for r in runs} == {(1, 2), (1, 1), (2, 2)}
    assert summary["all_exact"] and summary["tokenized_once"] and summary["uint16"]
    assert summary["disk_ratio"] <= 1.05
    by = {(r["scale"], r["num_proc"]): r for r in runs}
    assert by[(2, 2)]["tokens"] == 2 * by[(1, 2)]["tokens"] == 2 * by[(1, 1)]["tokens"]
    # one process or two: the same blocks (the manifest beside them records timings, a few bytes either way)
    assert abs(by[(1, 1)]["disk_bytes"] - by[(1, 2)]["disk_bytes"]) < 64
    assert summary["card_projection"]["hours"] > 0 and summary["card_projection"]["blocks_gb"] > 0


@needs_shared_data
def test_prepare_ranks_benchmark_shows_two_ranks_tokenize_once():
    one, two, summary = run_bench("bench_prepare_ranks.py", "--quick")
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["tokens"] == two["tokens"] and summary["tokenized_once"]
    assert summary["cpu_ratio"] == pytest.approx(two["cpu_s"] / one["cpu_s"], rel=1e-2)


@needs_shared_data
def test_held_out_sets_benchmark_gives_the_totals_of_their_union():
    [result] = run_bench("bench_heldout_sets.py", "--quick")
    assert result["same_totals"] and result["sets"] == 2
    assert result["sets_s"] > 0 and result["union_s"] > 0
    assert result["ratio"] == pytest.approx(result["sets_s"] / result["union_s"], rel=1e-2)


def test_watch_benchmark_compares_the_eta_with_the_time_training_took():
    [result] = run_bench("bench_watch.py", "--quick")

    assert set(result["eta_at"]) == {"25%", "50%", "75%"}
    for share, at in result["eta_at"].items():
        assert at["step"] >= float(share.rstrip("%")) / 100 * result["steps"]
        assert at["eta_s"] > 0 and 0 < at["real_s"] < result["train_seconds"]
        assert at["error"] == pytest.approx(abs(at["eta_s"] - at["real_s"]) / at["real_s"], abs=0.01 / at["real_s"])
    assert result["watching_calls"] >= result["steps"] and 0 < result["watching_share"] < 1


def test_forgetting_benchmark_scores_every_model_on_the_same_sets_and_merges_a_sharded_checkpoint():
    lines = run_bench("bench_forgetting.py", "--quick")
    models = {line["model"]: line for line in lines if "model" in line}
    [summary] = [line["summary"] for line in lines if "summary" in line]
    [sharded] = [line["sharded_merge"] for line in lines if "sharded_merge" in line]

    assert {"base", "alpha 0.25", "alpha 0.5", "alpha 0.75", "run", "average", "replay run"} <= set(models)
    assert summary["domain"] == ["biomed"] and summary["general"] and summary["base_scored_alike_by_both_merges"]
    assert models["checkpoint-4"]["domain"] == models["run"]["domain"]  # the last checkpoint is the run
    for line in models.values():
        assert line["domain"] == line["biomed"] and line["domain_cost"] == pytest.approx(
            line["domain"] - models["run"]["domain"], abs=2e-4)
    assert sharded["shards"] >= 2 and sharded["same_weights"] and sharded["igea_shards_kept"]
