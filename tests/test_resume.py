"""Exact resume: a run killed with SIGKILL resumes from its last complete checkpoint to the same weights."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from igea.cli import main
from igea.progress import human_size
from igea.rundir import CHECKPOINT_MARKER, RUN_MARKER

from conftest import stop_after_each_checkpoint, write_config

pytestmark = pytest.mark.slow

# Runs the igea CLI with one point of the run made to hang (so the test can SIGKILL it there) or to receive a
# signal, at a chosen step.
HANG_SCRIPT = """
import importlib, os, pathlib, signal, sys, time
T = importlib.import_module("igea.trainer")

flag, step, where = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def hang_here(global_step):
    if global_step == step:
        flag.write_text("ready")
        time.sleep(600)

if where == "after_checkpoint":
    original = T.IgeaTrainer._save_checkpoint
    def patched(self, model, trial):
        original(self, model, trial)
        hang_here(self.state.global_step)
    T.IgeaTrainer._save_checkpoint = patched
elif where == "inside_checkpoint":  # weights and optimizer written, RNG and trainer state not yet
    original = T.IgeaTrainer._save_rng_state
    def patched(self, output_dir):
        hang_here(self.state.global_step)
        original(self, output_dir)
    T.IgeaTrainer._save_rng_state = patched
elif where == "before_marker":  # the whole checkpoint written, its completion marker not yet
    original = T.mark_checkpoint_complete
    def patched(folder, extra):
        hang_here(extra["global_step"])
        original(folder, extra)
    T.mark_checkpoint_complete = patched
elif where == "staging_final_weights":  # training over, final weights staged but not yet renamed into place
    original = T.IgeaTrainer.save_model
    def patched(self, output_dir=None, _internal_call=False):
        original(self, output_dir, _internal_call)
        if str(output_dir).endswith(".final.tmp"):
            hang_here(self.state.global_step)
    T.IgeaTrainer.save_model = patched
elif where.startswith("SIG"):  # the process receives a signal during step `step + 1`
    original = T.IgeaTrainer.training_step
    def patched(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == step and not flag.exists():
            flag.write_text("sent")
            os.kill(os.getpid(), getattr(signal, where))
        return original(self, model, inputs, num_items_in_batch)
    T.IgeaTrainer.training_step = patched

from igea.cli import main
sys.exit(main(sys.argv[4:]))
"""


def resume_config(tmp_path: Path, name: str, model_dir: Path, corpus: Path, **training) -> Path:
    return write_config(tmp_path, name, model_dir, corpus, data={"validation_split": 16}, **{
        "max_steps": 30, "gradient_accumulation_steps": 2, "warmup_ratio": 0.1, "save_steps": 10, "eval_steps": 30,
        "logging_steps": 5, "seed": 7, **training})


def igea(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "igea", *args], capture_output=True, text=True, timeout=600)


def hang_script(tmp_path: Path, step: int, where: str, *argv: str) -> list[str]:
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    return [sys.executable, str(script), str(tmp_path / f"flag-{where}"), str(step), where, *argv]


def run_until_hang_then_kill(tmp_path: Path, config: Path, step: int, where: str) -> None:
    flag = tmp_path / f"flag-{where}"
    proc = subprocess.Popen(hang_script(tmp_path, step, where, "train", str(config)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not flag.exists():
        assert proc.poll() is None, "the run ended before reaching the kill point"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, corpus_file, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    done = igea("train", str(resume_config(tmp, "run", tiny_model_dir, corpus_file)))
    assert done.returncode == 0, done.stderr
    return tmp / "run"


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_sigkill_after_a_checkpoint_then_resume_is_bit_exact(uninterrupted, tiny_model_dir, corpus_file, tmp_path):
    config = resume_config(tmp_path, "killed", tiny_model_dir, corpus_file)
    run_until_hang_then_kill(tmp_path, config, step=10, where="after_checkpoint")
    out = tmp_path / "killed"
    assert (out / "checkpoint-10" / CHECKPOINT_MARKER).is_file() and not (out / RUN_MARKER).exists()

    refused = igea("train", str(config))
    assert refused.returncode == 2 and "use --resume" in refused.stderr

    size = sum(p.stat().st_size for p in (out / "checkpoint-10").rglob("*") if p.is_file())
    resumed = igea("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "checkpoint-10" in resumed.stderr
    said = resumed.stderr
    assert f"verifying checkpoint-10 ({human_size(size)} in " in said and "checkpoint-10 verified in " in said
    assert said.index("loading checkpoint-10: weights") < said.index("checkpoint-10 loaded in ")
    assert "training continues at step 10 of 30" in said
    assert "do not match the ones in the `trainer_state.json`" not in said  # the same cadence, counted alike
    assert_same_weights(uninterrupted, out)


def test_kill_inside_a_checkpoint_resumes_from_the_previous_one(uninterrupted, tiny_model_dir, corpus_file,
                                                               tmp_path):
    config = resume_config(tmp_path, "partial", tiny_model_dir, corpus_file)
    run_until_hang_then_kill(tmp_path, config, step=20, where="inside_checkpoint")
    out = tmp_path / "partial"
    assert (out / "checkpoint-20" / "model.safetensors").is_file()
    assert not (out / "checkpoint-20" / CHECKPOINT_MARKER).exists()

    resumed = igea("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint-10" in resumed.stderr and "resuming from" in resumed.stderr
    assert_same_weights(uninterrupted, out)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_saves_a_checkpoint_at_the_current_step_and_resume_is_bit_exact(
        signame, uninterrupted, tiny_model_dir, corpus_file, tmp_path):
    config = resume_config(tmp_path, "preempted", tiny_model_dir, corpus_file)
    stopped = subprocess.run(hang_script(tmp_path, 13, signame, "train", str(config)), capture_output=True, text=True,
                             timeout=600)
    out = tmp_path / "preempted"
    assert stopped.returncode == 128 + getattr(signal, signame), stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("igea: error: stopped by " + signame) and "at step 14 of 30" in last and "--resume" in last
    assert (out / "checkpoint-14" / CHECKPOINT_MARKER).is_file()
    assert not (out / RUN_MARKER).exists()  # a run stopped early is never marked finished

    resumed = igea("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "checkpoint-14" in resumed.stderr
    assert_same_weights(uninterrupted, out)


def test_kill_before_the_marker_with_save_total_limit_1_keeps_the_previous_checkpoint(
        uninterrupted, tiny_model_dir, corpus_file, tmp_path):
    config = resume_config(tmp_path, "rotated", tiny_model_dir, corpus_file, save_total_limit=1)
    run_until_hang_then_kill(tmp_path, config, step=20, where="before_marker")
    out = tmp_path / "rotated"
    assert (out / "checkpoint-10" / CHECKPOINT_MARKER).is_file()  # not rotated away before 20 was complete
    assert not (out / "checkpoint-20" / CHECKPOINT_MARKER).exists()

    resumed = igea("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "checkpoint-10" in resumed.stderr
    assert_same_weights(uninterrupted, out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-30"]  # the limit still holds


def test_kill_while_the_final_weights_are_staged_then_resume_trains_nothing_more(
        uninterrupted, tiny_model_dir, corpus_file, tmp_path):
    config = resume_config(tmp_path, "staged", tiny_model_dir, corpus_file, lr_scheduler_type="constant")
    run_until_hang_then_kill(tmp_path, config, step=30, where="staging_final_weights")
    out = tmp_path / "staged"
    assert (out / ".final.tmp").is_dir() and not (out / RUN_MARKER).exists()

    resumed = igea("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "nothing left to train" in resumed.stderr
    history = json.loads((out / "log_history.json").read_text())
    assert max(entry["step"] for entry in history) == 30  # no step 31
    reference = tmp_path / "constant"
    done = igea("train", str(resume_config(tmp_path, "constant", tiny_model_dir, corpus_file,
                                           lr_scheduler_type="constant")))
    assert done.returncode == 0, done.stderr
    assert_same_weights(reference, out)


def test_resume_with_a_changed_training_setting_is_refused_unless_allowed(tiny_model_dir, corpus_file, tmp_path):
    config = resume_config(tmp_path, "changed", tiny_model_dir, corpus_file)
    run_until_hang_then_kill(tmp_path, config, step=10, where="after_checkpoint")
    out = tmp_path / "changed"

    refused = igea("train", str(config), "--resume", "training.learning_rate=0.5", "data.block_size=32")
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert "training.learning_rate: 0.001 -> 0.5" in last and "data.block_size: 64 -> 32" in last
    assert "--allow-config-change" in last
    assert not (out / RUN_MARKER).exists()

    harmless = ["training.logging_steps=3", "training.eval_steps=15"]  # cadence only: no question asked
    allowed = igea("train", str(config), "--resume", "--allow-config-change", "training.learning_rate=0.5",
                   "data.block_size=32", *harmless)
    assert allowed.returncode == 0, allowed.stderr
    record = json.loads((out / RUN_MARKER).read_text())
    assert record["config"]["training"]["learning_rate"] == 0.5
    assert record["started_with"]["training"]["learning_rate"] == 0.001
    changes = record["resumes"][0]["changes"]
    assert changes["training.learning_rate"] == [0.001, 0.5] and "training.logging_steps" not in changes
    before = record["metrics"]["before"]  # computed again on the new blocks, not reused from the 64-token ones
    assert before["eval_tokens"] == record["metrics"]["after"]["eval_tokens"]


@pytest.mark.parametrize("damage", ["truncated optimizer", "zeroed weights"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(damage, uninterrupted, tiny_model_dir,
                                                                   corpus_file, tmp_path):
    config = resume_config(tmp_path, "damaged", tiny_model_dir, corpus_file)
    run_until_hang_then_kill(tmp_path, config, step=20, where="after_checkpoint")
    out = tmp_path / "damaged"
    if damage == "truncated optimizer":
        target = out / "checkpoint-20" / "optimizer.pt"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target = out / "checkpoint-20" / "model.safetensors"
        target.write_bytes(bytes(target.stat().st_size))

    resumed = igea("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint-20 cannot be resumed from: {target.name}" in resumed.stderr
    assert "resuming from" in resumed.stderr and "checkpoint-10" in resumed.stderr
    assert_same_weights(uninterrupted, out)


def test_ctrl_c_says_the_command_that_resumes_and_a_tied_model_resumes_without_missing_keys(
        tiny_model_dir, corpus_file, tmp_path, monkeypatch, capfd, caplog):
    """Ctrl-C after the first checkpoint: `igea: interrupted` names the checkpoint and the command (with the
    user's overrides) that continues the run; that command resumes a model with tied embeddings (its checkpoint
    holds the shared matrix once) without transformers reporting lm_head.weight as missing."""
    tied = tmp_path / "tied-model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=True)
                                     ).save_pretrained(tied)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tied)
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")  # one matrix, saved once
    config = write_config(tmp_path, "run", tied, corpus_file, data={"validation_split": 8}, max_steps=6,
                          save_steps=2, eval_steps=6)
    restore = stop_after_each_checkpoint(monkeypatch, KeyboardInterrupt)
    capfd.readouterr()
    assert main(["train", str(config), "training.seed=3"]) == 130
    last = capfd.readouterr().err.strip().splitlines()[-1]
    command = f"igea train {config} training.seed=3 --resume"
    assert last == f"igea: interrupted; checkpoint-2 is saved; continue with: {command}"

    restore()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(shlex.split(command)[1:]) == 0
    said = caplog.text + capfd.readouterr().err  # transformers' warnings may go to its own handler
    assert "checkpoint-2 loaded in " in said and "training continues at step 2 of 6" in said
    assert "missing keys" not in said and "lm_head" not in said
    assert (tmp_path / "run" / RUN_MARKER).is_file()
