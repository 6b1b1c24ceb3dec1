"""`igea.run`: the whole job — train, samples, benchmarks from the `eval:` section, and the model card."""

from __future__ import annotations

import json

import igea

from conftest import make_config

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
