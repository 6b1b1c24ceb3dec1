"""The run report: model card (README.md) and curves.png, checked against the published Igea-1B card."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

import igea
from igea.cli import main
from igea.report import (
    CARD_FILE,
    CURVES_FILE,
    DEFAULT_RISKS,
    curve_points,
    hyperparameter_lines,
    write_report,
)
from igea.rundir import RUN_MARKER

from conftest import ITALIAN_DOCS, build_trait_model, make_config

ROOT = Path(__file__).resolve().parents[1]
SEED_CARD = ROOT.parent / "shared" / "reference" / "igea-1b-model-card.md"
HYPERPARAMETERS_START = "The following hyperparameters were used during training:"

CARD_LAYOUT = {  # the Igea-1B run: 4 GPUs with DDP, 8 per device, 2 accumulation steps
    "distributed_type": "distributed", "num_devices": 4, "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 2, "total_train_batch_size": 64,
    "total_eval_batch_size": 32,
}
ONE_CPU = {
    "distributed_type": "not_parallel", "num_devices": 1, "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16, "gradient_accumulation_steps": 1, "total_train_batch_size": 8,
    "total_eval_batch_size": 16,
}
VERSIONS = {"igea": "0.1.0", "transformers": "5.0.0", "torch": "2.3.0", "datasets": "4.0.0",
            "tokenizers": "0.21.0"}


def seed_card() -> str:
    if not SEED_CARD.is_file():
        pytest.skip(f"{SEED_CARD} is not available")
    return SEED_CARD.read_text(encoding="utf-8")


def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of a Markdown table's body rows (header and separator dropped)."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows[2:]]


def fake_run(run_dir: Path, cfg: igea.IgeaConfig, layout: dict, metrics: dict, log_history: list) -> Path:
    """A run directory as `igea train` leaves it, minus the weights."""
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = {"config": cfg.to_dict(), "versions": VERSIONS, "layout": layout, "metrics": metrics}
    (run_dir / RUN_MARKER).write_text(json.dumps(marker), encoding="utf-8")
    (run_dir / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (run_dir / "log_history.json").write_text(json.dumps(log_history), encoding="utf-8")
    return run_dir


def card_history(card: str) -> list[dict]:
    """A Trainer log history that reproduces the seed card's training results table."""
    history = []
    for loss, epoch, step, eval_loss, accuracy in table_rows(between(card, "### Training results", "###")):
        step = int(step)
        history.append({"loss": float(loss), "epoch": float(epoch), "step": step})
        history.append({"eval_loss": float(eval_loss), "eval_accuracy": float(accuracy), "eval_runtime": 1.0,
                        "epoch": float(epoch), "step": step})
    last = history[-1]
    history.append({"train_runtime": 100.0, "train_loss": 1.8, "epoch": last["epoch"], "step": last["step"]})
    history.append({**last, "eval_runtime": 2.0})  # the evaluation after training repeats the last one
    return history


@pytest.fixture()
def igea_1b_card(tmp_path) -> tuple[str, str]:
    """(seed card, card rendered for a fake run of configs/igea-1b.yaml on the card's 4-GPU layout)."""
    card = seed_card()
    cfg = igea.load_config(ROOT / "configs" / "igea-1b.yaml", [f"training.output_dir={tmp_path / 'run'}"])
    benchmarks = {
        "medmcqa_ita": {"acc": 0.29, "acc_norm": 0.307, "num_fewshot": 0, "label": "MedMCQA-ITA", "domain": "Biomed"},
        "mmlu_it": {"acc": 0.25, "acc_norm": 0.255, "num_fewshot": 5, "label": "MMLU-IT", "domain": "General"},
    }
    metrics = {
        "data": {"train": {"documents": 900, "tokens": 1_000_000, "blocks": 488}},
        "before": {"eval_loss": 2.01234, "eval_accuracy": 0.55556},
        "after": {"eval_loss": 1.69761, "eval_accuracy": 0.60109, "eval_perplexity": 5.46},
        "benchmarks": benchmarks,
        "samples": {"Il fegato è ": "Il fegato è una ghiandola\ndel corpo."},
    }
    run_dir = fake_run(tmp_path / "run", cfg, CARD_LAYOUT, metrics, card_history(card))
    return card, write_report(run_dir).read_text(encoding="utf-8")


def hyperparameter_block(card: str) -> list[str]:
    block = between(card, HYPERPARAMETERS_START, "### Training results")
    return [line for line in block.splitlines() if line]


def test_hyperparameters_equal_the_seed_cards(igea_1b_card):
    seed, ours = igea_1b_card
    expected = hyperparameter_block(seed)
    got = hyperparameter_block(ours)
    assert got == expected
    assert "- optimizer: Adam with betas=(0.9,0.95) and epsilon=1e-08" in got  # not transformers 5's wording


def test_results_table_reproduces_the_seed_cards(igea_1b_card):
    seed, ours = igea_1b_card
    expected = table_rows(between(seed, "### Training results", "###"))
    got = table_rows(between(ours, "### Training results", "###"))
    assert len(got) == len(expected) == 10  # the repeated final evaluation is not a row
    assert [[float(c) for c in row] for row in got] == [[float(c) for c in row] for row in expected]


def test_card_metadata_and_sections(igea_1b_card):
    _, ours = igea_1b_card
    meta = yaml.safe_load(ours.split("---\n")[1])
    assert meta == {  # no license or tags: the preset shows them commented out, igea claims none by itself
        "language": ["it"], "library_name": "transformers", "base_model": "sapienzanlp/Minerva-1B-base-v1.0",
        "datasets": ["IVN-RIN/BioBERT_Italian"], "pipeline_tag": "text-generation",
    }
    assert ours.splitlines()[meta_end(ours) + 2] == "# Igea-1B"
    assert "- Loss: 1.6976\n- Accuracy: 0.6011" in ours
    assert "loss 2.0123 and accuracy 0.5556" in ours
    assert DEFAULT_RISKS in ours
    assert "- Transformers 5.0.0\n- Pytorch 2.3.0\n- Datasets 4.0.0\n- Tokenizers 0.21.0" in ours
    assert "tiny" not in ours


def meta_end(card: str) -> int:
    return card.splitlines().index("---", 1)


def test_benchmark_table_uses_normalized_accuracy(igea_1b_card):
    _, ours = igea_1b_card
    header = "| Dataset | Domain | Igea-1B |"
    assert header in ours
    rows = table_rows(header + ours.split(header, 1)[1])
    assert rows == [["MedMCQA-ITA (0-shot)", "Biomed", "0.307"], ["MMLU-IT (5-shot)", "General", "0.255"]]


def test_single_device_lines_follow_transformers_rules():
    training = {"learning_rate": 3e-4, "seed": 7, "optim": "sgd", "lr_scheduler_type": "linear",
                "warmup_steps": 10, "max_steps": 30, "fp16": True}
    layout = {**ONE_CPU, "gradient_accumulation_steps": 4, "total_train_batch_size": 32}
    assert hyperparameter_lines(training, layout) == [
        "- learning_rate: 0.0003",
        "- train_batch_size: 8",
        "- eval_batch_size: 16",
        "- seed: 7",
        "- gradient_accumulation_steps: 4",
        "- total_train_batch_size: 32",
        "- optimizer: Use sgd",
        "- lr_scheduler_type: linear",
        "- lr_scheduler_warmup_steps: 10",
        "- training_steps: 30",
        "- mixed_precision_training: Native AMP",
    ]


def test_fractional_epochs_and_warmup_steps_as_a_ratio():
    lines = hyperparameter_lines({"num_train_epochs": 2.5, "warmup_steps": 0.1, "adam_beta2": 0.999}, ONE_CPU)
    assert lines[-4:] == [
        "- optimizer: Adam with betas=(0.9,0.999) and epsilon=1e-08",
        "- lr_scheduler_type: linear",
        "- lr_scheduler_warmup_ratio: 0.1",
        "- num_epochs: 2.5",
    ]


def small_history() -> list[dict]:
    return [
        {"eval_loss": 3.0, "eval_accuracy": 0.1, "epoch": 0.02, "step": 1},
        {"loss": 2.75, "epoch": 0.1, "step": 5},
        {"loss": 2.5, "epoch": 0.2, "step": 10},
        {"eval_loss": 2.456789, "eval_accuracy": 0.25, "eval_model_preparation_time": 0.01, "epoch": 0.2,
         "step": 10},
        {"loss": 2.25, "epoch": 0.3, "step": 15},
        {"eval_loss": 2.2, "eval_accuracy": 0.3, "epoch": 0.4, "step": 18},
        {"train_runtime": 9.0, "train_loss": 2.5, "epoch": 0.4, "step": 18},
        {"eval_loss": 2.2, "eval_accuracy": 0.3, "epoch": 0.4, "step": 18},
    ]


def test_results_rows_take_the_last_training_loss(tmp_path, tiny_model_dir, corpus_file):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file)
    metrics = {"after": {"eval_loss": 2.2, "eval_accuracy": 0.3}}
    card = write_report(fake_run(tmp_path / "run", cfg, ONE_CPU, metrics, small_history())).read_text()
    assert table_rows(between(card, "### Training results", "###")) == [
        ["No log", "0.02", "1", "3.0", "0.1"],
        ["2.5", "0.2", "10", "2.4568", "0.25"],
        ["2.25", "0.4", "18", "2.2", "0.3"],
    ]
    assert f"]({CURVES_FILE})" in card
    header = next(line for line in card.splitlines() if line.startswith("| Training Loss"))
    assert [c.strip() for c in header.strip("|").split("|")] == [  # no column for other eval_* keys
        "Training Loss", "Epoch", "Step", "Validation Loss", "Accuracy"]


def test_curve_points_start_at_the_evaluation_before_training():
    points = curve_points(small_history(), before={"eval_loss": 4.0, "eval_accuracy": 0.0, "epoch": 0})
    assert points.train_loss == [(5, 2.75), (10, 2.5), (15, 2.25)]
    assert points.eval_loss == {"validation": [(0, 4.0), (1, 3.0), (10, 2.456789), (18, 2.2)]}
    assert points.eval_accuracy == {"validation": [(0, 0.0), (1, 0.1), (10, 0.25), (18, 0.3)]}


def test_without_matplotlib_the_card_says_so(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, card={"risks": "Solo per prove."})
    card = write_report(fake_run(tmp_path / "run", cfg, ONE_CPU, {}, small_history())).read_text()
    assert not (tmp_path / "run" / CURVES_FILE).exists()
    assert "matplotlib is missing" in card and CURVES_FILE not in card
    assert "## Bias, Risks and Limitations\n\nSolo per prove.\n" in card and DEFAULT_RISKS not in card
    assert "No held-out set was evaluated" in card


def test_cli_card_writes_the_card_and_reports_bad_dirs(tmp_path, tiny_model_dir, corpus_file, capsys):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file)
    run_dir = fake_run(tmp_path / "run", cfg, ONE_CPU, {}, small_history())
    assert main(["card", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / CARD_FILE)

    assert main(["card", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"igea: error: card: '{tmp_path}' is not a finished igea run (it has no {RUN_MARKER})"
    )
    (run_dir / "log_history.json").write_text("[{", encoding="utf-8")
    assert main(["card", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("igea: error: card: '") and "log_history.json' is not valid JSON" in err
    assert "\n" not in err


@pytest.mark.slow
def test_card_of_a_real_tiny_run(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    from PIL import Image

    data = {"max_documents": 80, "validation_split": 0.05}
    training = {"max_steps": 6, "eval_steps": 3, "logging_steps": 2, "save_steps": 6, "warmup_ratio": 0.0}
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data=data, training=training)
    result = igea.train(cfg)
    card = write_report(result.output_dir).read_text(encoding="utf-8")

    meta = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in meta  # a local directory is no hub id
    evals = [e for e in result.log_history if "eval_loss" in e]
    rows = table_rows(between(card, "### Training results", "###"))
    assert [int(r[2]) for r in rows] == [3, 6]
    assert float(rows[-1][3]) == pytest.approx(evals[-1]["eval_loss"], abs=1e-4)
    assert f"- Loss: {result.metrics['after']['eval_loss']:.4f}" in card
    block = between(card, HYPERPARAMETERS_START, "###")
    assert "- learning_rate: 0.001\n- train_batch_size: 4\n- eval_batch_size: 8\n- seed: 42\n" in block
    assert "- training_steps: 6" in block and "warmup" not in block and "num_devices" not in block

    with Image.open(result.output_dir / CURVES_FILE) as image:
        assert image.width >= 400 and image.height >= 200
        low, high = image.convert("L").getextrema()
        assert high - low > 100  # lines on a white background, not a blank canvas

    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert 'model_id = "run"  # this run\'s directory' in snippet
    for local in (tmp_path, tiny_model_dir, corpus_file.parent):  # nothing of this machine in a card to publish
        assert str(local) not in card
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        monkeypatch.chdir(result.output_dir.parent)  # the snippet runs beside the run directory
        exec(snippet, {})
    assert out.getvalue().startswith("Il fegato è ")


def test_how_to_use_shows_the_sample_generated_at_the_end(igea_1b_card):
    _, ours = igea_1b_card
    snippet = ours.split("## How to use")[1].split("```")[1]
    assert '# Output (sampled at the end of the run):\n# "Il fegato è una ghiandola del corpo."' in snippet


def test_card_of_a_mixed_run_shows_blocks_sources_and_tokens_seen(tmp_path, tiny_model_dir, corpus_file):
    """Whole blocks are mixed: the train line's tokens are blocks x block size, each source is listed with what
    it held, and the tokens each supplied during training are a line of their own (no empty bullets)."""
    lines = corpus_file.read_text(encoding="utf-8").splitlines()
    (tmp_path / "a.txt").write_text("\n".join(lines[:300]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(lines[300:]) + "\n", encoding="utf-8")
    sources = [{"path": str(tmp_path / "a.txt"), "weight": 0.7}, {"path": str(tmp_path / "b.txt"), "weight": 0.3}]
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data={"path": None, "sources": sources,
                                                                  "validation_split": 4},
                      training={"max_steps": 4, "eval_steps": 4, "save_steps": 4}, eval={"before_training": False})
    result = igea.train(cfg)
    card = write_report(result.output_dir).read_text(encoding="utf-8")
    summary = between(card, "## Training and evaluation data", "## Training procedure")
    bullets = [line for line in summary.splitlines() if line.startswith("- ")]
    assert all(line.split(":", 1)[1].strip() for line in bullets), bullets  # no empty bullet
    train = next(line for line in bullets if line.startswith("- train: "))
    blocks = result.metrics["data"]["train"]["blocks"]
    assert f"{blocks:,} blocks ({blocks * 64:,} tokens) mixed from a: " in train and "; b: " in train
    seen = next(line for line in bullets if line.startswith("- tokens trained on, per source: "))
    assert f"a {result.metrics['data']['tokens_seen']['a']:,} (" in seen


def test_a_card_to_publish_lists_hub_datasets_only_and_says_what_was_trained_on(tmp_path, tiny_model_dir,
                                                                                corpus_file):
    """Front matter: hub ids only (the shipped and local corpora are described in the text); the train line says
    the blocks available and the blocks trained on (1,066 read as 'what was trained' when 128 were); the Trainer's
    evaluation at the last step, right after one on the cadence with no training log between, is one row."""
    sources = [{"path": "IVN-RIN/BioBERT_Italian", "weight": 0.8}, {"path": "igea:general", "weight": 0.1},
               {"path": str(corpus_file), "weight": 0.1}]
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data={"path": None, "sources": sources})
    metrics = {"data": {"train": {"documents": 90, "tokens": 68_300, "blocks": 1_066}, "blocks_trained": 128},
               "after": {"eval_loss": 2.2, "eval_accuracy": 0.3}}
    history = [{"loss": 2.6, "epoch": 0.1, "step": 10}, {"eval_loss": 2.5, "eval_accuracy": 0.2, "step": 10},
               {"loss": 2.4, "epoch": 0.15, "step": 15},
               {"eval_loss": 2.2001, "eval_accuracy": 0.3, "epoch": 0.15, "step": 15},  # on the cadence
               {"eval_loss": 2.2, "eval_accuracy": 0.3, "epoch": 0.16, "step": 16},  # at the last step
               {"train_runtime": 9.0, "train_loss": 2.5, "epoch": 0.16, "step": 16}]
    card = write_report(fake_run(tmp_path / "run", cfg, ONE_CPU, metrics, history)).read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["datasets"] == ["IVN-RIN/BioBERT_Italian"]
    assert "the general (not medical) Italian text shipped with igea" in card
    assert "local files (`abstracts.txt`)" in card
    assert "- train: 90 documents, 68,300 tokens, 1,066 blocks available; trained on 128 blocks (0.12 epochs)" in card
    assert [row[2] for row in table_rows(between(card, "### Training results", "###"))] == ["10", "16"]
    with pytest.raises(igea.ConfigError, match="^card.datasets: 'igea:general' is not a hub dataset id"):
        make_config(tmp_path, tiny_model_dir, corpus_file, card={"datasets": ["IVN-RIN/BioBERT_Italian",
                                                                              "igea:general"]})


def test_a_degenerate_sample_is_not_the_usage_example_and_a_chat_template_is_explained(
        tmp_path, tiny_model_dir, corpus_file):
    """Greedy decoding of an undertrained model gives `Il fegato è 1200000000...`: not an output to show. A
    tokenizer that kept the chat template of an instruct base gets a line saying what it is worth here."""
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file)
    degenerate = {"samples": {"Il fegato è ": "Il fegato è 1200000000000000000000000000000"}}
    run_dir = fake_run(tmp_path / "run", cfg, ONE_CPU, degenerate, small_history())
    card = write_report(run_dir).read_text()
    usage = between(card, "## How to use", "## Bias")
    assert "# Output" not in usage and "120000" not in usage
    assert ("The sample the run generated for this prompt at its end is not shown as the output: it repeats '0' 29 "
            "times in a row, a degenerate continuation") in usage
    assert "chat template" not in card

    for text in ("Il fegato è il fegato è il fegato è il fegato è il fegato è", "Il fegato è "):
        (run_dir / "metrics.json").write_text(json.dumps({"samples": {"Il fegato è ": text}}), encoding="utf-8")
        assert "# Output" not in between(write_report(run_dir).read_text(), "## How to use", "## Bias"), text

    tied = build_trait_model("tied", ITALIAN_DOCS * 4, tmp_path / "tied")  # a tokenizer with a chat template
    AutoTokenizer.from_pretrained(tied).save_pretrained(run_dir)  # as the run saves its base's tokenizer
    usage = between(write_report(run_dir).read_text(), "## How to use", "## Bias")
    assert "The tokenizer keeps the chat template of the base model's tokenizer" in usage
    assert "neither trained nor evaluated here" in usage


def test_a_local_base_model_is_named_by_its_hub_id_and_the_snippet_by_the_repo(tmp_path, tiny_model_dir, corpus_file):
    """A base model in a local directory: the card's `base_model` comes from card.base_model, its usage snippet
    loads card.repo_id, and license and tags are there because the card section gives them."""
    card_section = {"base_model": "HuggingFaceTB/SmolLM2-135M", "repo_id": "asl/smol-bio-it", "license": "mit",
                    "tags": ["biomedical"]}
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, card=card_section)
    card = write_report(fake_run(tmp_path / "run", cfg, ONE_CPU, {}, small_history())).read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and meta["license"] == "mit"
    assert meta["tags"] == ["biomedical"]
    assert "Base model: [HuggingFaceTB/SmolLM2-135M](https://huggingface.co/HuggingFaceTB/SmolLM2-135M)." in card
    assert 'model_id = "asl/smol-bio-it"\npipeline = transformers.pipeline("text-generation", model=model_id' in card
    assert str(tmp_path) not in card and str(tiny_model_dir) not in card


@pytest.mark.parametrize(("key", "value", "said"), [
    ("base_model", "/models/smol", "is not a hub repo id"),
    ("repo_id", "smol-bio-it", "is not a hub repo id"),
    ("license", "Apache 2.0", "is not a hub license identifier"),
])
def test_card_metadata_that_the_hub_would_refuse_is_a_config_error(key, value, said):
    with pytest.raises(igea.ConfigError, match=f"^card.{key}: '{value}' {said}"):
        igea.load_config({"model": {"tiny": {}}, "data": {"path": "igea:sample"}, "card": {key: value}})


QUIZ = [
    ("Il fegato è", ["un organo", "un osso", "un muscolo"], 0),
    ("La fibrosi cistica è causata da mutazioni del gene", ["CFTR", "BRCA1"], 0),
]


def test_igea_card_eval_adds_the_benchmarks_of_igea_eval_output(tmp_path, tiny_model_dir, corpus_file, capsys):
    """`igea eval MODEL --tasks ... --output r.json`, then `igea card RUN --eval r.json`: the scores join the
    card's evaluation table and the run's metrics.json (without the per-question predictions), and a later
    `igea card RUN` keeps them."""
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}, ensure_ascii=False) + "\n"
                            for q, c, a in QUIZ), encoding="utf-8")
    results = tmp_path / "results.json"
    assert main(["eval", str(tiny_model_dir), "--tasks", str(quiz), "--output", str(results)]) == 0
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, card={"title": "Igea-tiny"})
    run_dir = fake_run(tmp_path / "run", cfg, ONE_CPU, {"after": {"eval_loss": 2.2}}, small_history())
    capsys.readouterr()

    assert main(["card", str(run_dir), "--eval", str(results)]) == 0
    score = json.loads(results.read_text())["models"][str(tiny_model_dir)]["tasks"]["quiz"]
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["after"] == {"eval_loss": 2.2}  # what was there stays
    assert saved["benchmarks"] == {"quiz": {k: v for k, v in score.items() if k != "predictions"}}
    assert main(["card", str(run_dir)]) == 0  # a later card keeps them
    card = (run_dir / CARD_FILE).read_text(encoding="utf-8")
    rows = table_rows("| Dataset" + card.split("## Evaluation")[1].split("| Dataset", 1)[1])
    assert rows == [[f"{score['label']} ({score['num_fewshot']}-shot)", score["domain"] or "-",
                     f"{score['acc_norm']:.3f}"]]

    assert main(["card", str(run_dir), "--eval", str(tmp_path / "missing.json")]) == 2
    assert "--eval: '" in capsys.readouterr().err
    held_out_only = tmp_path / "held_out.json"
    held_out_only.write_text(json.dumps({"models": {"run": {"held_out": {"loss": 2.0}}}}), encoding="utf-8")
    assert main(["card", str(run_dir), "--eval", str(held_out_only)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no benchmark scores for 'run'; run igea eval with --tasks" in err
