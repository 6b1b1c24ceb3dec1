"""`igea.run`: the whole job — train, samples, benchmarks from the `eval:` section, and the model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import igea
from igea.arguments import evaluation_share, relative_cadence, training_arguments
from igea.config import CADENCE_FLOOR_STEPS, config_from_dict

from conftest import config_dict, make_config

QUESTIONS = [
    ("Il fegato è", ["un organo", "un osso", "un muscolo"], 0),
    ("La fibrosi cistica è causata da mutazioni del gene", ["CFTR", "BRCA1"], 0),
    ("Il diabete di tipo 2 si tratta spesso con", ["metformina", "penicillina", "insulina rapida"], 0),
]


def test_run_trains_samples_scores_the_eval_tasks_and_writes_the_card(tiny_model_dir, corpus_file, tmp_path):
    task = tmp_path / "quiz.jsonl"
    task.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}, ensure_ascii=False) + "\n"
                            for q, c, a in QUESTIONS), encoding="utf-8")
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, training={"max_steps": 6},
                      generation={"prompts": ["Il fegato è ", "La terapia"], "max_new_tokens": 5},
                      eval={"tasks": [str(task)]})
    result = igea.run(cfg)

    saved = json.loads((cfg.output_dir / "metrics.json").read_text(encoding="utf-8"))
    assert set(saved["samples"]) == {"Il fegato è ", "La terapia"}
    assert all(text.startswith(prompt) for prompt, text in saved["samples"].items())
    [(name, score)] = saved["benchmarks"].items()
    assert 0 <= score["acc"] <= 1 and 0 <= score["acc_norm"] <= 1 and "predictions" not in score
    assert saved == json.loads(json.dumps(result.metrics, default=str))

    predictions = json.loads((cfg.output_dir / "benchmarks.json").read_text(encoding="utf-8"))[name]["predictions"]
    assert len(predictions) == len(QUESTIONS)
    assert score["acc"] == sum(p["pred"] == p["gold"] for p in predictions) / len(QUESTIONS)
    assert score["acc_norm"] == sum(p["pred_norm"] == p["gold"] for p in predictions) / len(QUESTIONS)

    card = (cfg.output_dir / "README.md").read_text(encoding="utf-8")
    assert "## Evaluation" in card and f"{score['acc_norm']:.3f}" in card.split("## Evaluation")[1]


def test_the_default_cadence_has_a_floor_and_what_the_config_sets_is_kept():
    """Evaluating and saving every tenth of the run, but at least CADENCE_FLOOR_STEPS steps apart, unless the
    config sets them; with load_best_model_at_end, saves fall on evaluations (transformers requires it)."""
    assert CADENCE_FLOOR_STEPS == 50
    assert relative_cadence({}, 10) == {"eval_steps": 50, "save_steps": 50}
    assert relative_cadence({}, 501) == {"eval_steps": 51, "save_steps": 51}
    assert relative_cadence({"eval_steps": 2}, 10) == {"save_steps": 50}
    assert relative_cadence({"eval_steps": 0.1, "save_steps": 5}, 10) == {}
    assert relative_cadence({"load_best_model_at_end": True, "eval_steps": 40}, 100) == {"save_steps": 80}
    assert relative_cadence({"load_best_model_at_end": True, "eval_steps": 0.3}, 100) == {"save_steps": 60}
    assert relative_cadence({"load_best_model_at_end": True, "save_steps": 30}, 1000) == {"eval_steps": 30}
    assert relative_cadence({"load_best_model_at_end": True}, 1000) == {"eval_steps": 100, "save_steps": 100}


def test_load_best_model_with_only_eval_steps_set_builds_its_training_arguments(tiny_model_dir, corpus_file, tmp_path):
    """transformers refuses a fraction for one and a count for the other with load_best_model_at_end."""
    raw = config_dict(tmp_path / "run", tiny_model_dir, corpus_file)
    del raw["training"]["save_steps"]
    raw["training"].update(load_best_model_at_end=True, eval_steps=40)
    args = training_arguments(config_from_dict(raw))
    assert args.load_best_model_at_end and args.save_steps % args.eval_steps == 0


def test_evaluation_share_counts_a_forward_block_as_a_third_of_a_trained_one():
    assert evaluation_share(0, 100, 10, 8) == 0
    assert evaluation_share(3, 80, 10, 8) == pytest.approx(0.5)  # 3 x 80 / 3 = 80 blocks against 10 x 8
    assert evaluation_share(1, 30, 90, 8) == pytest.approx(10 / 730)


@pytest.mark.slow
def test_run_in_a_script_logging_to_a_pipe_draws_no_progress_bars(tiny_model_dir, corpus_file, tmp_path):
    """`igea.run` in a script whose stderr is a file or a pipe: no datasets (tokenizing), transformers (loading
    and writing weights) or Trainer progress bars, as with the CLI; the caller's bar settings are back after."""
    raw = config_dict(tmp_path / "run", tiny_model_dir, corpus_file, data={"validation_split": 8,
                                                                          "cache_dir": str(tmp_path / "cache")},
                      training={"max_steps": 2, "eval_steps": 2, "save_steps": 2},
                      generation={"prompts": ["Il fegato è "], "max_new_tokens": 4})
    del raw["training"]["disable_tqdm"]  # igea decides
    code = ("import json, sys, igea\n"
            "from transformers.utils import logging\n"
            "from datasets import utils\n"
            "print(logging.is_progress_bar_enabled(), utils.are_progress_bars_disabled())\n"
            "igea.run(igea.load_config(json.loads(sys.argv[1])))\n"
            "print(logging.is_progress_bar_enabled(), utils.are_progress_bars_disabled())\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DISABLE_PROGRESS_BARS")}  # igea's CLI sets them
    done = subprocess.run([sys.executable, "-c", code, json.dumps(raw)], capture_output=True, text=True,
                          timeout=600, env={**env, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "README.md").is_file() and (tmp_path / "cache").is_dir()  # it tokenized, saved
    assert "\r" not in done.stderr and "it/s]" not in done.stderr
    for bar in ("Tokenizing", "Loading weights", "Writing model shards", "%|"):
        assert bar not in done.stderr, done.stderr
    assert done.stdout.split() == ["True", "False"] * 2  # bars on again, as the script had them
