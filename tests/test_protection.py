"""Output directories: igea writes only into new, empty or igea run directories, replaces only what it wrote,
keeps one run per directory, and turns a full or read-only disk into one line."""

from __future__ import annotations

import importlib
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from igea.cli import main
from igea.errors import IgeaError
from igea.rundir import LOCK_FILE, RUN_MARKER, START_MARKER, dir_contents
from igea.runstart import RunLock

from conftest import Interrupted, stop_after_each_checkpoint, write_config

pytestmark = pytest.mark.slow


def quick_config(tmp_path: Path, name: str, model_dir: Path, corpus: Path, **training) -> Path:
    return write_config(tmp_path, name, model_dir, corpus, data={"validation_split": 8},
                        **{"max_steps": 4, "save_steps": 2, "eval_steps": 4, **training})


def test_overwrite_replaces_only_what_igea_wrote(tiny_model_dir, corpus_file, tmp_path, capsys):
    config = quick_config(tmp_path, "run", tiny_model_dir, corpus_file, save_total_limit=1)
    assert main(["train", str(config)]) == 0
    out = tmp_path / "run"
    (out / ".ipynb_checkpoints").mkdir()  # a notebook opened in the run: neither foreign nor igea's
    (out / ".ipynb_checkpoints" / "README-checkpoint.md").write_text("kept")
    first = json.loads((out / RUN_MARKER).read_text())["started"]
    assert dir_contents(out).foreign == []

    assert main(["train", str(config), "training.max_steps=2", "--overwrite"]) == 0
    assert max(e["step"] for e in json.loads((out / "log_history.json").read_text())) == 2
    assert json.loads((out / START_MARKER).read_text())["started"] >= first
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # checkpoint-4 of the old run went
    assert (out / ".ipynb_checkpoints" / "README-checkpoint.md").read_text() == "kept"
    assert not (out / LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over_and_a_lock_from_another_host_is_explained(tiny_model_dir, corpus_file,
                                                                              tmp_path, caplog):
    config = quick_config(tmp_path, "run", tiny_model_dir, corpus_file)
    out = tmp_path / "run"
    out.mkdir()
    (out / START_MARKER).write_text("{}")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "started": "earlier"}))
    with caplog.at_level(logging.WARNING, logger="igea.runstart"):
        assert main(["train", str(config)]) == 0
    assert f"taking over the lock of process {dead_pid}, which no longer runs" in caplog.text

    other = tmp_path / "other"
    other.mkdir()
    (other / START_MARKER).write_text("{}")
    (other / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-17", "started": "2026-11-27 23:00:00"}))
    with pytest.raises(IgeaError, match="process 1 on host node-17.*delete the lock file"), RunLock(other):
        pass


def test_the_lock_is_reentrant_in_one_process_and_released_at_the_end(tmp_path):
    with RunLock(tmp_path / "run"):
        with RunLock(tmp_path / "run"):
            assert (tmp_path / "run" / LOCK_FILE).is_file()
        assert (tmp_path / "run" / LOCK_FILE).is_file()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_resume_auto_starts_a_run_where_there_is_none_and_continues_the_one_there_is(
        tiny_model_dir, corpus_file, tmp_path, monkeypatch, caplog):
    """`--resume=auto` is for a scheduler that requeues the same command: the first time it starts the run, after
    a crash it continues it from its checkpoint (`--resume auto`, two words, is the same)."""
    config = quick_config(tmp_path, "run", tiny_model_dir, corpus_file)
    restore = stop_after_each_checkpoint(monkeypatch, Interrupted)
    with caplog.at_level(logging.INFO, logger="igea.runstart"), pytest.raises(Interrupted):
        main(["train", str(config), "--resume=auto"])
    assert f"--resume=auto: {tmp_path / 'run'} holds no run yet, starting one" in caplog.text
    restore()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="igea.runstart"):
        assert main(["train", str(config), "--resume", "auto"]) == 0
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    assert (tmp_path / "run" / RUN_MARKER).is_file()


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_again(tiny_model_dir, corpus_file, tmp_path,
                                                                             monkeypatch, caplog, capsys):
    """A started run that saved no checkpoint is a run, not a typo: `--resume` starts it from the beginning and
    says so (a directory with no run at all is an error: tests/test_cli.py)."""
    config = quick_config(tmp_path, "run", tiny_model_dir, corpus_file)
    trainer_class = importlib.import_module("igea.trainer").IgeaTrainer

    def ctrl_c(self, model, inputs, num_items_in_batch=None):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(trainer_class, "training_step", ctrl_c)
        assert main(["train", str(config)]) == 130
    out = tmp_path / "run"
    assert (out / START_MARKER).is_file() and not list(out.glob("checkpoint-*"))
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"igea: interrupted; no checkpoint was saved yet, nothing to resume; start again with: igea train {config}")
    with caplog.at_level(logging.INFO, logger="igea.runstart"):
        assert main(["train", str(config), "--resume"]) == 0
    assert (f"--resume: the run in {out} has no complete checkpoint to continue from (it stopped before its first "
            "one was saved, or each is damaged): starting it again from the beginning") in caplog.text
    assert max(e["step"] for e in json.loads((out / "log_history.json").read_text())) == 4


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs: room for the run directory's first files, not for a checkpoint of the tiny model."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount_point)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_is_one_line_and_exit_2(small_disk, tiny_model_dir, corpus_file, tmp_path, capsys):
    config = quick_config(tmp_path, "run", tiny_model_dir, corpus_file)
    text = config.read_text().replace(str(tmp_path / "run"), str(small_disk / "run"))
    config.write_text(text)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("igea: error: ") and "no space left" in err.lower() and "--resume" in err


def test_a_read_only_output_dir_is_one_line_and_exit_2(small_disk, tiny_model_dir, corpus_file, tmp_path, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    config = quick_config(tmp_path, "run", tiny_model_dir, corpus_file)
    config.write_text(config.read_text().replace(str(tmp_path / "run"), str(small_disk / "run")))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("igea: error: Read-only file system") and str(small_disk) in err
