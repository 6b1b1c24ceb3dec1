"""Two CPU processes (gloo) reproduce one process at the same global batch; a broken launch is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from igea.cli import main
from igea.status import run_status

from conftest import raw_warning_lines, write_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"


def two_process_config(tmp_path: Path, name: str, model_dir: Path, corpus: Path) -> Path:
    return write_config(tmp_path, name, model_dir, corpus, max_steps=12, total_train_batch_size=8, eval_steps=6,
                        logging_steps=3, save_steps=12)


def test_two_gloo_ranks_match_one_process_at_the_same_global_batch(tiny_model_dir, corpus_file, tmp_path):
    one = two_process_config(tmp_path, "one", tiny_model_dir, corpus_file)
    two = two_process_config(tmp_path, "two", tiny_model_dir, corpus_file)
    single = subprocess.run([sys.executable, "-m", "igea", "train", str(one)], capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "cpu-2proc.yaml"),
              "-m", "igea", "train", str(two)]
    double = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]

    runs = {name: json.loads((tmp_path / name / "igea_run.json").read_text()) for name in ("one", "two")}
    assert runs["one"]["layout"]["num_devices"] == 1 and runs["one"]["layout"]["gradient_accumulation_steps"] == 2
    assert runs["two"]["layout"]["num_devices"] == 2 and runs["two"]["layout"]["gradient_accumulation_steps"] == 1
    assert runs["one"]["layout"]["total_train_batch_size"] == runs["two"]["layout"]["total_train_batch_size"] == 8
    one_after, two_after = runs["one"]["metrics"]["after"], runs["two"]["metrics"]["after"]
    assert abs(one_after["eval_loss"] - two_after["eval_loss"]) < 1e-4
    assert abs(one_after["eval_accuracy"] - two_after["eval_accuracy"]) < 1e-4
    # every reported training metric is a mean over ranks, not a sum
    one_train, two_train = runs["one"]["metrics"]["train"], runs["two"]["metrics"]["train"]
    assert abs(one_train["train_loss"] - two_train["train_loss"]) < 1e-3
    losses = {name: [e["loss"] for e in json.loads((tmp_path / name / "log_history.json").read_text())
                     if "loss" in e] for name in ("one", "two")}
    assert losses["one"] == pytest.approx(losses["two"], abs=1e-3)
    # the main process alone keeps the status, which `igea status` reads whatever the number of processes
    status = run_status(tmp_path / "two")
    assert (status["state"], status["step"], status["max_steps"]) == ("finished", 12, 12)
    assert status["evaluation"]["loss"] == pytest.approx(two_after["eval_loss"])
    assert sum("evaluating at step 6: " in line for line in double.stderr.splitlines()) == 1  # the main process

def test_the_readme_multi_process_commands_run_from_a_fresh_output_dir(tmp_path):
    """README's two CPU data-parallel commands on the demo config, nothing prepared: the rank that builds the
    tiny model and the blocks goes first, the other reads them; both match one process at the same batch.
    Their output, and that of `make demo`'s command, holds log lines only: no raw warning, none from DDP's
    reducer (igea does not ask it to look for unused parameters)."""
    common = ["training.max_steps=6", "training.eval_steps=6", "training.save_steps=6", "training.logging_steps=3",
              "training.total_train_batch_size=16", "generation.max_new_tokens=8"]
    igea = ["-m", "igea", "train", "configs/demo.yaml"]
    commands = {
        "one": [sys.executable, *igea],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *igea,
                     "training.ddp_backend=gloo"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       "configs/accelerate/cpu-2proc.yaml", *igea],
    }
    runs = {}
    for name, command in commands.items():
        done = subprocess.run([*command, f"training.output_dir={tmp_path / name}", *common,
                               f"data.cache_dir={tmp_path / ('cache-' + name)}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        assert raw_warning_lines(done.stdout + done.stderr) == [], name
        assert "find_unused_parameters" not in done.stderr, name
        # each line of the run once: the other process logs only warnings
        assert sum(" igea.data: train split: " in line for line in done.stderr.splitlines()) == 1, name
        runs[name] = json.loads((tmp_path / name / "igea_run.json").read_text())
    assert [runs[n]["layout"]["num_devices"] for n in commands] == [1, 2, 2]
    losses = [runs[n]["metrics"]["after"]["eval_loss"] for n in commands]
    assert max(losses) - min(losses) < 1e-4, losses
    for name in ("torchrun", "accelerate"):  # the corpus was tokenized once, by rank 0; rank 1 opened its blocks
        assert runs[name]["metrics"]["data"]["cache_by_rank"] == ["built", "loaded"]


def test_a_refusal_on_two_ranks_is_one_line_without_tracebacks(tiny_model_dir, corpus_file, tmp_path):
    """The main process refuses the output directory; the other rank ends with it instead of a lost connection."""
    config = two_process_config(tmp_path, "taken", tiny_model_dir, corpus_file)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.tex").write_text("not igea's")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "cpu-2proc.yaml"),
              "-m", "igea", "train", str(config)]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert done.stderr.count("igea: error: ") == 1 and "holds no igea run" in done.stderr
    assert "Connection closed by peer" not in done.stderr and "[rank1]" not in done.stderr
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["thesis.tex"]


SIGNAL_ONE_RANK = """
import importlib, os, signal, sys
T = importlib.import_module("igea.trainer")
original = T.IgeaTrainer.training_step

def patched(self, model, inputs, num_items_in_batch=None):
    if self.state.global_step == 4 and os.environ.get("RANK") == "1" and not getattr(self, "_signalled", False):
        self._signalled = True
        os.kill(os.getpid(), signal.SIGUSR1)  # as a scheduler that reached one node first
    return original(self, model, inputs, num_items_in_batch)

T.IgeaTrainer.training_step = patched
from igea.cli import main
from igea.status import run_status
sys.exit(main(sys.argv[1:]))
"""


def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step_and_resume_matches(tiny_model_dir,
                                                                                        corpus_file, tmp_path):
    script = tmp_path / "signal_one_rank.py"
    script.write_text(SIGNAL_ONE_RANK)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "cpu-2proc.yaml")]
    whole = two_process_config(tmp_path, "whole", tiny_model_dir, corpus_file)
    stopped = two_process_config(tmp_path, "stopped", tiny_model_dir, corpus_file)
    done = subprocess.run([*launch, "-m", "igea", "train", str(whole)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    cut = subprocess.run([*launch, str(script), "train", str(stopped)], capture_output=True, text=True, timeout=600)
    assert cut.returncode != 0
    assert "igea: error: stopped by SIGUSR1 at step 5 of 12" in cut.stderr  # rank 0 learnt it from rank 1
    assert (tmp_path / "stopped" / "checkpoint-5" / "igea_checkpoint.json").is_file()
    assert not (tmp_path / "stopped" / "igea_run.json").exists()

    resumed = subprocess.run([*launch, "-m", "igea", "train", str(stopped), "--resume"], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {name: json.loads((tmp_path / name / "igea_run.json").read_text())["metrics"]["after"]
             for name in ("whole", "stopped")}
    assert after["stopped"]["eval_loss"] == pytest.approx(after["whole"]["eval_loss"], abs=1e-6)


def test_a_launch_that_silently_started_one_process_is_refused(tiny_model_dir, corpus_file, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --cpu --num_processes 2` leaves
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", str(two_process_config(tmp_path, "bad", tiny_model_dir, corpus_file))]) == 2
    assert "asked for several processes but started one" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_sharded_strategy_on_a_machine_without_gpus_is_refused(flag, tiny_model_dir, corpus_file, tmp_path,
                                                                capsys, monkeypatch):
    """accelerate would run FSDP or DeepSpeed configs on CPU as plain DDP, with nothing sharded and no word."""
    monkeypatch.setenv(flag, "true")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["train", str(two_process_config(tmp_path, "cpu", tiny_model_dir, corpus_file))]) == 2
    assert "accelerate runs only on GPUs" in capsys.readouterr().err
    assert not (tmp_path / "cpu").exists()


def test_processes_that_did_not_join_one_group_are_refused(tiny_model_dir, corpus_file, tmp_path, capsys,
                                                          monkeypatch):
    """torchrun on CPU without use_cpu / gloo: each process would train alone, over the same directory."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    config = two_process_config(tmp_path, "alone", tiny_model_dir, corpus_file)
    assert main(["train", str(config), "training.use_cpu=false"]) == 2
    assert "did not join one process group" in capsys.readouterr().err
    assert not (tmp_path / "alone").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in ACCELERATE.glob("*.yaml")))
def test_shipped_accelerate_configs_are_valid(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE / name))
    assert config.num_processes >= 2 and config.num_processes % config.num_machines == 0
