"""Exact resume: a run killed with SIGKILL resumes from its last complete checkpoint to the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from igea.rundir import CHECKPOINT_MARKER, RUN_MARKER

from conftest import write_config

pytestmark = pytest.mark.slow

# Runs the igea CLI with one checkpoint step made to hang at a chosen point, so the test can kill it there.
HANG_SCRIPT = """
import importlib, pathlib, sys, time
T = importlib.import_module("igea.train")  # the module (the package's `igea.train` is the function)

flag, step, where = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def hang_here(trainer):
    if trainer.state.global_step == step:
        flag.write_text("ready")
        time.sleep(600)

if where == "after_checkpoint":
    original = T.IgeaTrainer._save_checkpoint
    def patched(self, model, trial):
        original(self, model, trial)
        hang_here(self)
    T.IgeaTrainer._save_checkpoint = patched
else:  # inside a checkpoint: weights and optimizer written, RNG and trainer state not yet
    original = T.IgeaTrainer._save_rng_state
    def patched(self, output_dir):
        hang_here(self)
        original(self, output_dir)
    T.IgeaTrainer._save_rng_state = patched

from igea.cli import main
sys.exit(main(sys.argv[4:]))
"""


def resume_config(tmp_path: Path, name: str, model_dir: Path, corpus: Path) -> Path:
    return write_config(tmp_path, name, model_dir, corpus, max_steps=30, gradient_accumulation_steps=2,
                        warmup_ratio=0.1, save_steps=10, eval_steps=30, logging_steps=5, seed=7)


def igea(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "igea", *args], capture_output=True, text=True, timeout=600)


def run_until_hang_then_kill(tmp_path: Path, config: Path, step: int, where: str) -> None:
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    flag = tmp_path / f"hanging-{where}"
    proc = subprocess.Popen([sys.executable, str(script), str(flag), str(step), where, "train", str(config)],
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
    assert refused.returncode == 2 and "pass --resume" in refused.stderr

    resumed = igea("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "checkpoint-10" in resumed.stderr
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
