"""Forgetting, measured: named held-out sets and per-source validation, each evaluated on its own through training,
with token-weighted totals, in every place a user reads them (logs, metrics.json, TensorBoard, card, curves)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

import igea
from igea.basemodel import load_tokenizer
from igea.cli import main
from igea.config import GENERAL_TEXT, config_from_dict, shipped_corpus_path
from igea.data import prepare_dataset
from igea.evaluate import held_out_metrics
from igea.report import CURVES_FILE, curve_points, held_out_summary

from conftest import config_dict, make_config, real_abstracts, train_until_first_checkpoint, write_config

pytestmark = pytest.mark.slow

BLOCK = 64
SETS_TRAINING = {"max_steps": 12, "eval_steps": 6, "save_steps": 6, "logging_steps": 3}


def error_line(capsys) -> str:
    """The CLI's one error line (a progress bar of a library imported before the CLI set its policy may precede
    it when the CLI runs inside this test process, never in a process of its own)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if line.startswith("igea: error:")] == lines[-1:]
    return lines[-1]


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory):
    """Twenty real abstracts not in the training corpus, as jsonl: the domain's held-out set."""
    path = tmp_path_factory.mktemp("sets") / "dev.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in real_abstracts("dev", 20)),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_sets_run(tiny_model_dir, corpus_file, dev_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_sets")
    data = {"validation_split": 0, "validation_path": {"biomed": str(dev_file), "general": GENERAL_TEXT}}
    training = {**SETS_TRAINING, "report_to": "tensorboard"}
    cfg = make_config(tmp, tiny_model_dir, corpus_file, data=data, training=training)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        return cfg, igea.run(cfg)


def test_each_named_set_equals_igea_eval_of_that_set_alone(two_sets_run, dev_file):
    cfg, result = two_sets_run
    after = result.metrics["after"]
    for name, path in (("biomed", str(dev_file)), ("general", GENERAL_TEXT)):
        alone = igea.evaluate(str(cfg.output_dir), corpus=path)["models"][str(cfg.output_dir)]["held_out"]
        assert after[f"eval_{name}_loss"] == pytest.approx(alone["loss"], abs=1e-6)
        assert after[f"eval_{name}_accuracy"] == pytest.approx(alone["accuracy"], abs=1e-9)
        assert after[f"eval_{name}_tokens"] == alone["tokens"]
        assert after[f"eval_{name}_perplexity"] == pytest.approx(math.exp(alone["loss"]), rel=1e-6)


def test_the_total_is_the_token_weighted_mean_and_tokens_are_blocks_times_block_minus_one(two_sets_run):
    _, result = two_sets_run
    stats = result.metrics["data"]["validation_sets"]
    for metrics in (result.metrics["before"], result.metrics["after"]):
        tokens = {name: metrics[f"eval_{name}_tokens"] for name in ("biomed", "general")}
        for name in tokens:
            assert tokens[name] == stats[name]["blocks"] * (BLOCK - 1)
        assert metrics["eval_tokens"] == sum(tokens.values())
        for metric in ("loss", "accuracy"):
            weighted = sum(metrics[f"eval_{n}_{metric}"] * tokens[n] for n in tokens) / sum(tokens.values())
            assert metrics[f"eval_{metric}"] == pytest.approx(weighted, rel=1e-12)
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert result.metrics["before"]["eval_biomed_loss"] != result.metrics["before"]["eval_general_loss"]


def test_every_evaluation_logs_every_set_once(two_sets_run):
    cfg, result = two_sets_run
    evals = [e for e in result.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [6, 12]
    for entry in evals:
        for name in ("biomed", "general"):
            assert {f"eval_{name}_{m}" for m in ("loss", "accuracy", "perplexity", "tokens")} <= entry.keys()
    saved = json.loads((cfg.output_dir / "metrics.json").read_text(encoding="utf-8"))
    assert saved["before"]["eval_general_loss"] == result.metrics["before"]["eval_general_loss"]
    assert saved["after"]["eval_biomed_loss"] == evals[-1]["eval_biomed_loss"]


def test_tensorboard_holds_one_scalar_per_set(two_sets_run):
    cfg, result = two_sets_run
    [log_dir] = (cfg.output_dir / "runs").iterdir()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag in ("eval/loss", "eval/biomed_loss", "eval/general_loss", "eval/general_accuracy"):
        assert [step for step, _ in scalars[tag]] == [0, 6, 12], tag
    assert scalars["eval/general_loss"][0][1] == pytest.approx(result.metrics["before"]["eval_general_loss"])


def test_card_and_curves_hold_every_set(two_sets_run):
    cfg, result = two_sets_run
    card = (cfg.output_dir / "README.md").read_text(encoding="utf-8")
    held = card.split("### Held-out sets", 1)[1].split("##", 1)[0]
    rows = [line for line in held.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["biomed", "general", "all"]
    after, before = result.metrics["after"], result.metrics["before"]
    general = rows[1]
    assert f"{before['eval_general_loss']:.4f}" in general and f"{after['eval_general_loss']:.4f}" in general
    assert f"{after['eval_general_loss'] - before['eval_general_loss']:+.4f}" in general
    results = card.split("### Training results", 1)[1].split("###", 1)[0]
    assert "Validation Loss (biomed)" in results and "Validation Loss (general)" in results
    assert f"{after['eval_general_loss']:.4f}" in results
    points = curve_points(result.log_history, before)
    assert list(points.eval_loss) == ["all", "biomed", "general"]
    assert [step for step, _ in points.eval_loss["general"]] == [0, 6, 12]
    assert (cfg.output_dir / CURVES_FILE).stat().st_size > 10_000


def test_the_console_summary_puts_the_sets_side_by_side(two_sets_run):
    _, result = two_sets_run
    lines = held_out_summary(result.metrics).splitlines()
    assert lines[0].startswith("held-out loss, perplexity and next-token accuracy, before -> after")
    assert [line.split()[0] for line in lines[1:]] == ["biomed", "general", "all"]
    before, after = result.metrics["before"]["eval_general_loss"], result.metrics["after"]["eval_general_loss"]
    assert f"loss {before:.4f} -> {after:.4f} ({after - before:+.4f})" in lines[2]


def test_igea_eval_names_sets_and_compares_each(two_sets_run, dev_file, capsys):
    cfg, result = two_sets_run
    run, base = str(cfg.output_dir), cfg.model.name_or_path
    code = main(["eval", run, "--corpus", f"biomed={dev_file}", "--corpus", "general=igea:general",
                 "--compare", base, "--output", str(cfg.output_dir.parent / "eval.json")])
    assert code == 0
    printed = capsys.readouterr().out
    saved = json.loads((cfg.output_dir.parent / "eval.json").read_text(encoding="utf-8"))
    sets = saved["models"][run]["held_out_sets"]
    assert sets["general"]["loss"] == pytest.approx(result.metrics["after"]["eval_general_loss"], abs=1e-6)
    base_sets = saved["models"][base]["held_out_sets"]
    assert base_sets["general"]["loss"] == pytest.approx(result.metrics["before"]["eval_general_loss"], abs=1e-6)
    change = saved["change"]["held_out_sets"]["general"]["loss"]
    assert change == pytest.approx(sets["general"]["loss"] - base_sets["general"]["loss"])
    assert saved["models"][run]["held_out"]["loss"] == pytest.approx(result.metrics["after"]["eval_loss"], abs=1e-6)
    assert saved["held_out_data"]["sets"]["general"]["blocks"] == result.metrics["data"]["validation_sets"][
        "general"]["blocks"]
    assert "2 sets: biomed, general" in printed
    assert any(line.split()[:2] == ["change", "general"] for line in printed.splitlines())


def test_igea_eval_on_the_runs_own_training_files_warns(two_sets_run, corpus_file, dev_file, caplog):
    cfg, _ = two_sets_run
    with caplog.at_level("WARNING", logger="igea.evaluate"):
        igea.evaluate(str(cfg.output_dir), corpus={"mine": str(corpus_file), "biomed": str(dev_file)})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"held-out set 'mine' includes '{corpus_file}', which run '{cfg.output_dir}' trained on: "
                        "these are not held-out numbers (use text the run never saw)"]


def test_resume_keeps_the_per_set_history(tiny_model_dir, corpus_file, dev_file, tmp_path, monkeypatch):
    data = {"validation_split": 0, "validation_path": {"biomed": str(dev_file), "general": GENERAL_TEXT}}
    whole = igea.train(make_config(tmp_path / "whole", tiny_model_dir, corpus_file, data=data,
                                   training=SETS_TRAINING))
    cfg = make_config(tmp_path / "resumed", tiny_model_dir, corpus_file, data=data, training=SETS_TRAINING)
    train_until_first_checkpoint(cfg, monkeypatch)
    resumed = igea.train(cfg, resume=True)
    keys = [f"eval_{n}_{m}" for n in ("biomed", "general") for m in ("loss", "accuracy", "tokens")]
    evals = [[e[k] for e in r.log_history if "eval_loss" in e for k in keys] for r in (whole, resumed)]
    assert len(evals[0]) == 2 * len(keys) and evals[1] == pytest.approx(evals[0])


def test_each_source_split_is_a_set_named_by_its_label(tiny_model_dir, corpus_file, tmp_path):
    texts = corpus_file.read_text(encoding="utf-8").splitlines()
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("\n".join(texts[:300]) + "\n", encoding="utf-8")
    second.write_text("\n".join(texts[300:]) + "\n", encoding="utf-8")
    data = {"path": None, "validation_split": 0.1, "sources": [
        {"path": str(first), "label": "domain"}, {"path": str(second), "weight": 0.5}]}
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data=data, training={"max_steps": 6, "eval_steps": 6,
                                                                                   "save_steps": 6})
    result = igea.train(cfg)
    after = result.metrics["after"]
    assert set(result.metrics["data"]["validation_sets"]) == {"domain", "b"}
    assert set(result.metrics["data"]["tokens_seen"]) == {"domain", "b"}
    sets = prepare_dataset(cfg, load_tokenizer(cfg)).validation_sets
    model = AutoModelForCausalLM.from_pretrained(cfg.output_dir)
    for name, blocks in sets.items():
        direct = held_out_metrics(model, blocks)
        assert after[f"eval_{name}_loss"] == pytest.approx(direct["loss"], abs=1e-6)
        assert after[f"eval_{name}_tokens"] == direct["tokens"] == len(blocks) * (BLOCK - 1)


def test_load_best_model_at_end_on_a_named_set_keeps_and_restores_that_checkpoint(tiny_model_dir, corpus_file,
                                                                                  dev_file, tmp_path):
    data = {"validation_split": 0, "validation_path": {"biomed": str(dev_file), "general": GENERAL_TEXT}}
    # the loss falls through this run: the *highest* general loss is the first evaluation's, never the last
    training = {**SETS_TRAINING, "max_steps": 18, "save_total_limit": 1, "load_best_model_at_end": True,
                "metric_for_best_model": "eval_general_loss", "greater_is_better": True}
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data=data, training=training)
    result = igea.run(cfg)
    evals = [e for e in result.log_history if "eval_general_loss" in e]
    assert [e["step"] for e in evals] == [6, 12, 18] and evals[0]["eval_general_loss"] > evals[-1]["eval_general_loss"]
    best = result.metrics["best"]
    assert best["step"] == 6 and best["checkpoint"] == "checkpoint-6" and best["metric"] == "eval_general_loss"
    assert sorted(p.name for p in cfg.output_dir.glob("checkpoint-*")) == ["checkpoint-18", "checkpoint-6"]
    final = load_file(cfg.output_dir / "model.safetensors")
    kept = load_file(cfg.output_dir / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in kept)
    assert result.metrics["after"]["eval_general_loss"] == evals[0]["eval_general_loss"]
    card = (cfg.output_dir / "README.md").read_text(encoding="utf-8")
    assert "The weights are those of step 6 of 18 (`checkpoint-6`)" in card and "highest" in card


def test_benchmarks_are_scored_at_every_evaluation(tiny_model_dir, corpus_file, tmp_path):
    questions = tmp_path / "domande.jsonl"
    rows = [{"question": t[:60], "choices": [t[60:90], "un osso del piede", "il freddo"], "answer": 0}
            for t in real_abstracts("test", 6)]
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    training = {**SETS_TRAINING, "load_best_model_at_end": True, "metric_for_best_model": "eval_domande_acc_norm"}
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, training=training,
                      eval={"tasks": [str(questions)], "during_training": True})
    result = igea.run(cfg)
    evals = [e for e in result.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [6, 12]
    assert all("eval_domande_acc" in e and "eval_domande_acc_norm" in e for e in evals)
    assert "eval_domande_acc_norm" in result.metrics["before"]
    best_step = result.metrics["best"]["step"]
    logged = next(e for e in evals if e["step"] == best_step)
    assert result.metrics["benchmarks"]["domande"]["acc_norm"] == pytest.approx(logged["eval_domande_acc_norm"])
    assert list(curve_points(result.log_history, result.metrics["before"]).benchmarks) == ["domande"]


def test_a_benchmark_metric_is_checked_once_the_tasks_are_loaded(tiny_model_dir, corpus_file, tmp_path, capsys):
    questions = tmp_path / "domande.jsonl"
    questions.write_text(json.dumps({"question": "Il fegato è", "choices": ["un organo", "un osso"], "answer": 0})
                         + "\n", encoding="utf-8")
    path = write_config(tmp_path, "run", tiny_model_dir, corpus_file, metric_for_best_model="eval_domandee_acc")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["eval"] = {"tasks": [str(questions)], "during_training": True}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = error_line(capsys)
    assert "eval_domandee_acc" in err and "eval_domande_acc, eval_domande_acc_norm" in err
    assert not (tmp_path / "run").exists()


def test_a_streamed_corpus_evaluates_each_named_set(tiny_model_dir, corpus_file, dev_file, tmp_path):
    data = {"streaming": True, "validation_split": 20, "validation_path": {"general": GENERAL_TEXT}}
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data=data, training={"max_steps": 4, "eval_steps": 4,
                                                                                   "save_steps": 4})
    result = igea.train(cfg)
    assert set(result.metrics["data"]["validation_sets"]) == {"abstracts", "general"}
    alone = igea.evaluate(str(cfg.output_dir), corpus=GENERAL_TEXT)["models"][str(cfg.output_dir)]["held_out"]
    assert result.metrics["after"]["eval_general_loss"] == pytest.approx(alone["loss"], abs=1e-6)


def test_warmup_stable_decay_takes_its_decay_as_a_share_of_the_run(tiny_model_dir, corpus_file, tmp_path):
    training = {"max_steps": 20, "logging_steps": 1, "eval_steps": 20, "save_steps": 20, "learning_rate": 1e-3,
                "warmup_ratio": 0.1, "lr_scheduler_type": "warmup_stable_decay",
                "lr_scheduler_kwargs": {"num_decay_steps": 0.25}}
    result = igea.train(make_config(tmp_path, tiny_model_dir, corpus_file, training=training))
    rates = [e["learning_rate"] for e in result.log_history if "learning_rate" in e]
    assert len(rates) == 20
    # each log gives the rate its step trained with: 2 warm-up steps, 13 stable ones, then 5 decaying
    assert rates[0] < rates[1] < rates[2] == rates[15] == pytest.approx(1e-3)
    assert rates.count(rates[2]) == 14
    assert all(a > b for a, b in zip(rates[15:], rates[16:], strict=False)) and rates[-1] < 0.1 * rates[2]


def test_the_demo_evaluates_biomed_and_general_side_by_side():
    cfg = igea.load_config(igea.preset("demo"))
    from igea.config import held_out_set_names

    assert held_out_set_names(cfg.data) == ["biomed", "general"]
    text = Path(shipped_corpus_path(GENERAL_TEXT)).read_text(encoding="utf-8")
    assert len(text.split(". ")) > 200 and "pazienti" not in text


@pytest.mark.parametrize(("data", "training", "message"), [
    ({"validation_path": {"gen-eral": GENERAL_TEXT}}, {},
     "data.validation_path.gen-eral: 'gen-eral' is not allowed as the name of a held-out set"),
    ({"validation_path": {"abstracts": GENERAL_TEXT}}, {},
     "data.validation_path.abstracts: two held-out sets are named 'abstracts' (data.label and"),
    ({"validation_path": {"general": []}}, {}, "data.validation_path.general: [] names no file"),
    ({"validation_path": {"general": "nothing-*.txt"}}, {}, "data.validation_path.general: no file matches"),
    ({"validation_path": {"general": "EMPTY"}}, {}, "data.validation_path.general: 'EMPTY' is empty"),
    ({"validation_path": {}}, {}, "data.validation_path: {} names no held-out set"),
    ({"validation_path": {"general": GENERAL_TEXT}}, {"metric_for_best_model": "eval_genral_loss"},
     "training.metric_for_best_model: 'eval_genral_loss' names no held-out set or metric the run logs; did you "
     "mean 'eval_general_loss'"),
    ({"validation_split": 0}, {"metric_for_best_model": "eval_loss"},
     "training.metric_for_best_model: 'eval_loss' needs a held-out set to evaluate"),
    ({"path": {"a": "b"}}, {}, "data.path: expected a string or a list of strings or null, got {'a': 'b'}"),
    ({"sources": [{"path": GENERAL_TEXT, "label": "x y"}], "path": None}, {},
     "data.sources[0].label: 'x y' is not allowed as the name of a source"),
])
def test_bad_held_out_sets_are_one_line_and_exit_2_before_anything_is_written(tiny_model_dir, corpus_file, tmp_path,
                                                                              capsys, data, training, message):
    empty = tmp_path / "EMPTY"
    empty.write_text("", encoding="utf-8")
    data = {k: (str(empty) if v == "EMPTY" else v) if k != "validation_path" or not isinstance(v, dict) else
            {n: str(empty) if p == "EMPTY" else p for n, p in v.items()} for k, v in data.items()}
    message = message.replace("'EMPTY'", f"'{empty}'")
    path = write_config(tmp_path, "run", tiny_model_dir, corpus_file, data=data, **training)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"igea: error: {message}"), err
    assert "\n" not in err and not (tmp_path / "run").exists()


def test_a_set_name_written_twice_in_yaml_is_refused(tiny_model_dir, corpus_file, tmp_path, capsys):
    path = write_config(tmp_path, "run", tiny_model_dir, corpus_file)
    text = path.read_text(encoding="utf-8").replace(
        "data:\n", f"data:\n  validation_path:\n    general: {GENERAL_TEXT}\n    general: {corpus_file}\n", 1)
    path.write_text(text, encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "key 'general' appears twice in one mapping (lines 3 and 4)" in err and "\n" not in err


def test_a_set_too_short_for_a_block_is_named(tiny_model_dir, corpus_file, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Oggi piove.\n", encoding="utf-8")
    path = write_config(tmp_path, "run", tiny_model_dir, corpus_file,
                        data={"validation_path": {"general": GENERAL_TEXT, "tiny": str(short)}})
    assert main(["train", str(path)]) == 2
    err = error_line(capsys)
    assert err.startswith("igea: error: data: the held-out set 'tiny' has") and "fewer than one block" in err
    assert not (tmp_path / "run").exists()


def test_records_without_text_are_counted_and_located(tiny_model_dir, tmp_path, caplog):
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"text": t} for t in real_abstracts("dev", 30)]
    rows[6] = {"title": "senza testo"}
    rows[11] = {"text": None}
    rows[12] = {"text": "  "}
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    raw = config_dict(tmp_path / "run", tiny_model_dir, corpus, data={"path": str(corpus), "validation_split": 0})
    with caplog.at_level("INFO", logger="igea.data"):
        data = prepare_dataset(config_from_dict(raw), load_tokenizer(config_from_dict(raw)))
    lines = [r.getMessage() for r in caplog.records if "kept" in r.getMessage()]
    assert lines == [f"corpus: kept 27 of 30 documents (dropped: 2 without a 'text' value, the first in '{corpus}' "
                     "line 7; 1 empty or shorter than 1 characters)"]
    assert data.stats["train"]["documents"] == 27
