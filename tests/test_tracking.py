"""Live tracking: TensorBoard event files from `report_to`, `log_throughput` in the logs, missing packages refused."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments

from igea.cli import main
from igea.config import ConfigError
from igea.tracking import TrainingClock, events_left, flops_per_token

from conftest import config_dict, make_config, write_config

train_module = importlib.import_module("igea.train")

TRACKED = {"report_to": "tensorboard", "log_throughput": True, "max_steps": 10, "logging_steps": 5,
           "eval_steps": 5, "save_strategy": "no"}


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, corpus_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)  # TensorBoard's own default is ./runs of the current directory
        cfg = make_config(tmp, tiny_model_dir, corpus_file, training=TRACKED, data={"validation_split": 8})
        result = train_module.train(cfg)
    assert not (tmp / "runs").exists()
    return result


@pytest.mark.slow
def test_tensorboard_gets_losses_accuracy_learning_rate_and_throughput(tracked_run):
    [log_dir] = (tracked_run.output_dir / "runs").iterdir()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [step for step, _ in scalars["train/loss"]] == [5, 10]
    assert [step for step, _ in scalars["train/learning_rate"]] == [5, 10]
    assert [step for step, _ in scalars["train/tokens_per_second"]] == [5, 10]
    # before training and during it; the evaluation at the last step is the run's final one (not repeated)
    assert [step for step, _ in scalars["eval/loss"]] == [0, 5, 10]
    assert [step for step, _ in scalars["eval/accuracy"]] == [0, 5, 10]
    history = [e for e in tracked_run.log_history if "loss" in e]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx([e["loss"] for e in history])
    assert scalars["eval/loss"][0][1] == pytest.approx(tracked_run.metrics["before"]["eval_loss"])


@pytest.mark.slow
def test_log_throughput_puts_positive_tokens_per_second_in_every_training_log(tracked_run):
    training_logs = [e for e in tracked_run.log_history if "loss" in e]
    assert len(training_logs) == 2
    assert all(isinstance(e["tokens_per_second"], float) and e["tokens_per_second"] > 0 for e in training_logs)
    assert not any("mfu" in e for e in tracked_run.log_history)  # no GPU peak on a CPU
    assert not any("tokens_per_second" in e for e in tracked_run.log_history if "loss" not in e)
    saved = json.loads((tracked_run.output_dir / "log_history.json").read_text())
    assert [e.get("tokens_per_second") for e in saved] == [e.get("tokens_per_second") for e in tracked_run.log_history]


def test_the_clock_leaves_evaluation_and_checkpoints_out_of_the_speed_and_counts_them_in_the_eta(monkeypatch):
    clock = iter([0.0, 0.0, 1.0, 2.0, 12.0, 14.0, 15.0, 15.0])  # made, train begin, 2 steps, eval, save, step, log
    monkeypatch.setattr("igea.tracking.time.perf_counter", lambda: next(clock))
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             use_cpu=True, report_to="none", eval_strategy="steps", eval_steps=5, save_steps=5)
    state, control = TrainerState(max_steps=10), TrainerControl()
    callback = TrainingClock(block_size=64, flops_per_token=1e9, peak_flops=1e12)
    callback.on_train_begin(args, state, control)
    callback.on_step_end(args, state, control)  # t=1
    callback.on_step_end(args, state, control)  # t=2
    callback.on_evaluate(args, state, control)  # 10 s of evaluation, ends at t=12
    callback.on_save(args, state, control)  # a 2 s checkpoint, ends at t=14
    callback.on_step_end(args, state, control)  # t=15
    state.global_step = 3
    state.log_history.append({"loss": 1.0, "step": 3})
    logs = {"loss": 1.0}
    callback.on_log(args, state, control, logs=logs)  # t=15: 3 steps in 3 s of training
    tokens_per_second = 3 * 4 * 2 * 64 / 3  # 512.0
    assert logs == {"loss": 1.0, "tokens_per_second": tokens_per_second, "mfu": 0.512}
    assert state.log_history[-1] == {**logs, "step": 3}
    assert callback.last["seconds_per_step"] == 1.0
    # 7 steps left at 1 s, and the evaluations and saves of steps 5 and 10 at 10 s and 2 s each
    assert callback.last["eta"] == 7 * 1.0 + 2 * 10.0 + 2 * 2.0
    assert "1 s/step  512 tok/s  MFU 51% | " in callback.timing(logs) and callback.timing(logs).endswith(
        ", ETA 31 s")


@pytest.mark.parametrize(("step", "every", "last", "left"), [
    (0, 5, 10, 2), (3, 5, 10, 2), (5, 5, 10, 2), (6, 5, 10, 1), (10, 5, 10, 1), (1, 4, 10, 3), (9, 4, 10, 1),
    (0, 50, 10, 1), (4, 0.25, 12, 3),
])
def test_events_left_count_those_of_the_current_step_and_the_last_one(step, every, last, left):
    args = TrainingArguments(output_dir="unused", eval_strategy="steps", eval_steps=every, save_strategy="no",
                             report_to="none")
    assert events_left(args, TrainerState(global_step=step, max_steps=last)) == (left, 0)


def test_flops_per_token_counts_frozen_weights_without_their_gradient(tiny_model_dir, corpus_file, tmp_path):
    from igea.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    c = model.config
    matmul = model.num_parameters() - model.get_input_embeddings().weight.numel()
    attention = 12 * c.num_hidden_layers * c.hidden_size * 64
    assert flops_per_token(model, 64) == 6 * matmul + attention  # full training: 6 N + 12 L H T

    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, peft={"r": 4, "modules_to_save": ["lm_head"]})
    adapted = apply_lora(model, cfg)
    trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    head = c.vocab_size * c.hidden_size
    assert flops_per_token(adapted, 64) == 6 * trained + 4 * (matmul - head) + attention


def test_missing_integration_is_one_line_before_anything_is_written(tiny_model_dir, corpus_file, tmp_path, capsys,
                                                                   monkeypatch):
    for name in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, name, None)  # find_spec then reports it missing, as transformers checks
    raw = config_dict(tmp_path / "run", tiny_model_dir, corpus_file)
    config = tmp_path / "c.json"  # a tiny model: it would be built into run/base-model first
    config.write_text(json.dumps({**raw, "model": {"tiny": {"vocab_size": 300}}}))
    assert main(["train", str(config), "training.report_to=tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err == 'igea: error: training.report_to: tensorboard is not installed; pip install "igea[tracking]" ' \
                  "(or tensorboard)\n"
    assert not (tmp_path / "run").exists()


def test_unknown_integration_is_a_config_error(tiny_model_dir, corpus_file, tmp_path, capsys):
    config = write_config(tmp_path, "typo", tiny_model_dir, corpus_file, report_to=["tensorbord"])
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("igea: error: training.report_to: 'tensorbord' is not an integration; choose from all, "
                          "none, ") and "tensorboard" in err and err.count("\n") == 1
    assert not (tmp_path / "typo").exists()


def test_log_throughput_must_be_true_or_false(tiny_model_dir, corpus_file, tmp_path):
    with pytest.raises(ConfigError, match="training.log_throughput: expected true/false, got 'often'"):
        make_config(tmp_path, tiny_model_dir, corpus_file, training={"log_throughput": "often"})
