"""The `igea` command: exit codes, one-line errors on stderr, and a full run from the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import igea
from igea.cli import main

from conftest import write_config

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and igea.__version__ in capsys.readouterr().out


def test_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  tiny: {}\ndata:\n  path: igea:sample\ntraining:\n  learnig_rate: 1\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("igea: error: unknown key 'training.learnig_rate'")
    assert not (tmp_path / "runs").exists()


def test_bad_override_exit_2(capsys):
    assert main(["train", str(ROOT / "configs" / "demo.yaml"), "training.nope=1"]) == 2
    assert "unknown key 'training.nope'" in capsys.readouterr().err


def test_debug_shows_the_traceback_and_keeps_exit_2(tmp_path, capsys):
    assert main(["--debug", "train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "igea.errors.ConfigError" in err
    assert err.splitlines()[-1].startswith("igea: error: config: file")


def test_unreachable_hub_model_fails_fast_with_one_line(tmp_path):
    """The card's recipe on a machine without network: the hub id is named, no traceback, exit 2."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "igea", "train", str(ROOT / "configs" / "igea-1b.yaml"),
         f"training.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("igea: error: cannot load model 'sapienzanlp/Minerva-1B-base-v1.0'")
    assert "Traceback" not in proc.stderr
    assert elapsed < 60
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_from_the_command_line(tiny_model_dir, corpus_file, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  name_or_path: {tiny_model_dir}\n"
        f"data:\n  path: {corpus_file}\n  block_size: 64\n"
        f"training:\n  output_dir: {tmp_path / 'run'}\n  max_steps: 6\n  per_device_train_batch_size: 4\n"
        "  eval_steps: 3\n  save_steps: 3\n  logging_steps: 3\n  use_cpu: true\n  disable_tqdm: true\n"
        "generation:\n  prompts: ['Il fegato è ']\n  max_new_tokens: 5\n"
    )
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    before, after = saved["before"]["eval_loss"], saved["after"]["eval_loss"]
    assert f"  held-out  loss {before:.4f} -> {after:.4f} ({after - before:+.4f})" in out
    assert "sample for 'Il fegato è '" in out
    assert main(["train", str(config)]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert main(["train", str(config), "--overwrite"]) == 0


def test_import_igea_and_the_help_load_no_heavy_module():
    """`import igea`, `igea --help` and `igea --version` stay fast: torch and transformers load on first use."""
    code = ("import sys, igea; from igea.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_public_functions_named_like_their_modules_stay_functions():
    code = ("import igea; igea.run; import igea.train, igea.evaluate, igea.generate; "
            "print(all(callable(f) and not isinstance(f, type(igea)) for f in "
            "(igea.train, igea.run, igea.evaluate, igea.generate)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


@pytest.mark.parametrize("preset", ["demo", "igea-350m", "igea-1b", "igea-3b"])
def test_init_writes_a_commented_starter_config_that_loads(preset, tmp_path, capsys):
    """Every key of every preset says on its line what it is or why it has that value; the card's license and
    tags are commented-out examples, not claims."""
    assert main(["init", "--preset", preset]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("#") and printed == (ROOT / "configs" / f"{preset}.yaml").read_text()
    keys = [line for line in printed.splitlines() if re.match(r"\s*[\w-]+:", line)]
    assert len(keys) > 10
    uncommented = [line for line in keys if not re.search(r"\S\s{2,}# \S", line)]
    assert not uncommented, uncommented
    assert re.search(r"^\s*#\s+license: ", printed, re.M) and re.search(r"^\s*#\s+tags: ", printed, re.M)
    target = tmp_path / "my.yaml"
    assert main(["init", "--preset", preset, "--output", str(target)]) == 0
    cfg = igea.load_config(target)
    assert cfg.training["learning_rate"] > 0
    assert cfg.card.license is None and cfg.card.tags == []
    assert main(["init", "--output", str(target)]) == 2  # never replaces a file
    assert "exists" in capsys.readouterr().err


def test_train_output_in_a_log_file_is_readable_lines(tiny_model_dir, corpus_file, tmp_path):
    """Not on a terminal: no progress bars redrawn per step, each log one line with numbers as numbers."""
    config = write_config(tmp_path, "run", tiny_model_dir, corpus_file, data={"validation_split": 8}, max_steps=10,
                          eval_steps=5, logging_steps=5, save_steps=10, disable_tqdm=None)
    text = config.read_text().replace("  disable_tqdm: null\n", "")
    config.write_text(text)
    done = subprocess.run([sys.executable, "-m", "igea", "train", str(config)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "igea.tracking: step " in line]
    assert any("step 5/10 (50.0%)  loss " in line for line in lines) and any("eval_loss " in line for line in lines)
    assert "{'" not in done.stderr and "': '" not in done.stderr  # no dict of quoted numbers
    assert done.stderr.count("kept ") <= 1  # the corpus is cleaned (and reported) once, or read from the cache
    evaluations = [line for line in lines if "eval_loss" in line and "step 10/10" in line]
    assert len(evaluations) == 1  # the final metrics reuse the evaluation at the last step


def test_resume_of_a_directory_with_no_run_is_an_error_naming_it(tiny_model_dir, corpus_file, tmp_path, capsys):
    """`--resume` with a typo in output_dir used to start a whole new run with one warning line; now it is one
    error line, exit 2, nothing written (`--resume=auto` is the mode that starts a run when there is none)."""
    config = write_config(tmp_path, "run", tiny_model_dir, corpus_file)
    typo = tmp_path / "rnu"
    hint = ("check training.output_dir, or use --resume=auto (Python: resume=\"auto\") to start a run there when "
            "there is none")
    assert main(["train", str(config), f"training.output_dir={typo}", "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"igea: error: --resume: '{typo}' holds no run to continue (it does not exist); {hint}\n")
    assert not typo.exists()
    typo.mkdir()
    assert main(["train", str(config), "--resume", f"training.output_dir={typo}"]) == 2  # overrides after the flag
    assert capsys.readouterr().err == (
        f"igea: error: --resume: '{typo}' holds no run to continue (it is empty); {hint}\n")
    assert list(typo.iterdir()) == []
    (typo / "base-model").mkdir()  # what igea.load_model builds before a run: not a run
    (typo / "base-model" / "igea_tiny.json").write_text("{}")
    cfg = igea.load_config(config, [f"training.output_dir={typo}"])
    with pytest.raises(igea.IgeaError, match="holds no run to continue .it holds no igea_start.json nor checkpoint"):
        igea.train(cfg, resume=True)
    with pytest.raises(igea.IgeaError, match="resume: 'yes' is not allowed; use True .*, False, or 'auto'"):
        igea.train(cfg, resume="yes")
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(config), "--resume=yes"])
    assert exit_.value.code == 2
    assert "expected --resume or --resume=auto, got --resume=yes" in capsys.readouterr().err


def test_ctrl_c_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch, capsys):
    """The interrupted line names the command to run again, with the user's overrides (quoted for a shell)."""
    def interrupted(cfg, **flags):
        (cfg.output_dir / "checkpoint-4").mkdir(parents=True)  # never marked complete: not resumable
        raise KeyboardInterrupt

    monkeypatch.setattr(igea, "run", interrupted)
    config = ROOT / "configs" / "demo.yaml"
    out = tmp_path / "my run"
    assert main(["train", str(config), f"training.output_dir={out}", "card.title=Il mio modello"]) == 130
    assert capsys.readouterr().err == (
        "igea: interrupted; no checkpoint was saved yet, nothing to resume; start again with: "
        f"igea train {config} 'training.output_dir={out}' 'card.title=Il mio modello'\n")
