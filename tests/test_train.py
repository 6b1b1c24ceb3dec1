"""A tiny continued-pretraining run: the loss goes down, outputs are saved, finished runs are protected."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from igea.arguments import evaluation_share, training_arguments
from igea.config import config_from_dict
from igea.errors import ConfigError, IgeaError
from igea.metrics import count_correct
from igea.rundir import RUN_MARKER, share_like_other_files
from igea.train import train

from conftest import config_dict, make_config, train_until_first_checkpoint


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, corpus_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = make_config(tmp, tiny_model_dir, corpus_file)
    return cfg, train(cfg)


def test_eval_loss_goes_down_and_metrics_are_saved(finished_run):
    cfg, result = finished_run
    before, after = result.metrics["before"], result.metrics["after"]
    assert after["eval_loss"] < before["eval_loss"] - 0.2
    assert after["eval_accuracy"] > before["eval_accuracy"]
    saved = json.loads((cfg.output_dir / "metrics.json").read_text())
    assert saved["after"]["eval_loss"] == after["eval_loss"]
    assert saved["after"]["eval_perplexity"] == pytest.approx(torch.tensor(after["eval_loss"]).exp().item())
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert losses[-1] < losses[0]


def test_run_dir_holds_safetensors_tokenizer_and_marker(finished_run):
    cfg, _ = finished_run
    out = cfg.output_dir
    assert (out / "model.safetensors").is_file() and not list(out.glob("pytorch_model*.bin"))
    assert (out / "tokenizer.json").is_file() and (out / RUN_MARKER).is_file()
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["config"]["training"]["learning_rate"] == 1e-3 and "transformers" in marker["versions"]
    weights = load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])


def test_the_weights_are_as_readable_as_every_other_file_of_the_run(finished_run, tmp_path):
    """safetensors writes its files mode 0600 whatever the umask (a temporary file renamed into place): on a shared
    cluster the colleagues who may read a run could not read its weights. Every weight file igea writes gets the
    mode of the files beside it (0644 under umask 022)."""
    cfg, _ = finished_run
    out = cfg.output_dir
    checkpoint = next(out.glob("checkpoint-*"))
    for folder in (out, checkpoint):
        assert mode(folder / "model.safetensors") == mode(folder / "config.json"), folder
    old = os.umask(0o022)
    try:
        save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
        (tmp_path / "config.json").write_text("{}")
        share_like_other_files(tmp_path)
    finally:
        os.umask(old)
    assert mode(tmp_path / "model.safetensors") == mode(tmp_path / "config.json") == 0o644


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_trainer_accuracy_equals_a_forward_pass_by_hand(finished_run):
    cfg, result = finished_run
    from igea.basemodel import load_tokenizer
    from igea.data import prepare_dataset

    data = prepare_dataset(cfg, load_tokenizer(cfg))
    model = AutoModelForCausalLM.from_pretrained(cfg.output_dir).eval()
    ids = torch.tensor(data.validation["input_ids"], dtype=torch.long)
    with torch.no_grad():
        predictions = model(ids).logits.argmax(-1)
    correct, counted = count_correct(predictions, ids)
    assert result.metrics["after"]["eval_accuracy"] == pytest.approx(correct / counted, abs=1e-6)


def test_finished_run_is_never_overwritten_without_asking(finished_run):
    cfg, _ = finished_run
    stamp = (cfg.output_dir / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(IgeaError, match="holds a finished run; use --overwrite"):
        train(cfg)
    assert (cfg.output_dir / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_train_loss_after_a_resume_is_the_mean_over_all_the_run_steps(tiny_model_dir, corpus_file, tmp_path,
                                                                       monkeypatch):
    """transformers 5 averages `train_loss` over the steps of its `train()` call: after a resume, over those since
    the checkpoint only (4.268 against 4.417 uninterrupted, issue 26). The checkpoint at step 3 falls between two
    logs (every 4 steps), as a preemption's does: the loss of steps 1-3, not yet logged, is carried too, so the loss
    logged at step 4 is that of steps 1-4, not of step 4 alone."""
    training = {"max_steps": 6, "save_steps": 3, "logging_steps": 4, "eval_steps": 6, "seed": 5}
    data, quick = {"validation_split": 2}, {"before_training": False}
    whole = train(make_config(tmp_path / "whole", tiny_model_dir, corpus_file, training=training, data=data,
                              eval=quick))
    cfg = make_config(tmp_path / "resumed", tiny_model_dir, corpus_file, training=training, data=data, eval=quick)
    train_until_first_checkpoint(cfg, monkeypatch)
    resumed = train(cfg, resume=True)
    want = whole.metrics["train"]["train_loss"]
    assert resumed.metrics["train"]["train_loss"] == pytest.approx(want, abs=1e-6, rel=0)
    assert resumed.log_history[-1]["train_loss"] == resumed.metrics["train"]["train_loss"]  # the logged line too
    logged = [{e["step"]: e["loss"] for e in r.log_history if "loss" in e} for r in (whole, resumed)]
    assert list(logged[1]) == [4] and logged[1] == pytest.approx(logged[0], abs=1e-6, rel=0)
    assert resumed.metrics["after"]["eval_loss"] == whole.metrics["after"]["eval_loss"]  # the rest was already equal
    blocks = 6 * cfg.training["per_device_train_batch_size"]
    assert resumed.metrics["data"]["blocks_trained"] == whole.metrics["data"]["blocks_trained"] == blocks


def test_card_warmup_ratio_maps_to_fractional_warmup_steps(tiny_model_dir, corpus_file, tmp_path):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, training={"warmup_ratio": 0.02})
    args = training_arguments(cfg)
    assert args.warmup_steps == 0.02
    assert args.get_warmup_steps(1000) == 20


def test_total_batch_size_sets_accumulation(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, training={"total_train_batch_size": 16})
    assert training_arguments(cfg).gradient_accumulation_steps == 4
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, training={"total_train_batch_size": 10})
    with pytest.raises(ConfigError, match="total_train_batch_size: 10 is not divisible by"):
        training_arguments(cfg)


def test_block_size_above_model_context_is_refused(tiny_model_dir, corpus_file, tmp_path):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data={"block_size": 4096})
    with pytest.raises(ConfigError, match="data.block_size: 4096 is longer than the model's context"):
        train(cfg)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, corpus_file, tmp_path):
    from igea.rundir import CHECKPOINT_MARKER, last_complete_checkpoint
    from igea.trainer import NonFiniteLossError

    cfg = make_config(tmp_path, tiny_model_dir, corpus_file,
                      training={"learning_rate": 1e30, "max_steps": 40, "save_steps": 1, "warmup_ratio": 0.0,
                                "max_grad_norm": 0.0, "logging_nan_inf_filter": True})
    with pytest.raises(NonFiniteLossError, match="training loss became (nan|inf) at step") as err:
        train(cfg)
    step = int(str(err.value).split("at step ")[1].split(";")[0])
    checkpoint = last_complete_checkpoint(cfg.output_dir)
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{step - 1}"
    assert (checkpoint / CHECKPOINT_MARKER).is_file()
    assert not (cfg.output_dir / RUN_MARKER).exists()
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_default_cadence_logs_often_but_evaluates_and_saves_a_short_run_once(tiny_model_dir, corpus_file, tmp_path,
                                                                             caplog):
    """The defaults are the card's optimizer but a cadence relative to the run: 10 steps still log at every step,
    but evaluate and save only at their end (at least 50 steps apart), and one process does not accumulate
    gradients (the card's 2 steps were for its 4 GPUs). The evaluations' share of the run is estimated aloud."""
    raw = config_dict(tmp_path / "run", tiny_model_dir, corpus_file)
    for key in ("logging_steps", "eval_steps", "save_steps", "gradient_accumulation_steps"):
        raw["training"].pop(key)
    raw["training"]["max_steps"] = 10
    cfg = config_from_dict(raw)
    assert training_arguments(cfg).gradient_accumulation_steps == 1
    with caplog.at_level("INFO", logger="igea.arguments"):
        result = train(cfg)
    assert len([e for e in result.log_history if "loss" in e]) == 10
    assert [e["step"] for e in result.log_history if "eval_loss" in e] == [10]
    assert sorted(p.name for p in cfg.output_dir.glob("checkpoint-*")) == ["checkpoint-10"]
    assert "evaluating and saving at the last step only in 10 steps" in caplog.text
    blocks = result.metrics["data"]["validation"]["blocks"]
    share = evaluation_share(2, blocks, 10, 4)  # before and after training, 4 blocks a step
    assert share > 0.25
    said = f"held-out evaluation will take about {100 * share:.0f}% of this run: 2 evaluations x {blocks} "
    assert said in caplog.text


@pytest.mark.parametrize(("peft", "training", "expected"), [
    (None, {}, False),
    ({"r": 4, "modules_to_save": ["embed_tokens", "lm_head"]}, {}, False),
    (None, {"ddp_find_unused_parameters": True}, True),  # a model whose forward may skip weights (MoE)
])
def test_ddp_looks_for_unused_parameters_only_when_asked(peft, training, expected, tiny_model_dir, corpus_file,
                                                         tmp_path):
    """The Trainer's own default is to look (an extra autograd traversal each step) unless gradient
    checkpointing is on, and always for a peft model; every weight of a dense model or LoRA adapter is used."""
    from igea.basemodel import load_model
    from igea.data import PreparedData
    from igea.lora import apply_lora
    from igea.trainer import build_trainer

    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, training=training, data={"validation_split": 0},
                      **({"peft": peft} if peft is not None else {}))
    model, tokenizer = load_model(cfg)
    if cfg.peft is not None:
        model = apply_lora(model, cfg)
    trainer = build_trainer(cfg, training_arguments(cfg), model, tokenizer, PreparedData([]))
    assert trainer.accelerator.ddp_handler.find_unused_parameters is expected
