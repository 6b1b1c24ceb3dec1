"""Long work you can watch: every line of a run in a log file says how far it is, how fast it goes and when it
ends; evaluations, saves and one-off work announce themselves and their time; `igea status` tells what a run is
doing or did, from another process."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

import igea
from igea.cli import main
from igea.data import estimated_documents
from igea.errors import IgeaError
from igea.rundir import LOCK_FILE, STATUS_FILE
from igea.status import run_status

from conftest import Interrupted, config_dict, make_config, stop_after_each_checkpoint

WATCHED = {"max_steps": 6, "logging_steps": 2, "eval_steps": 3, "save_steps": 3, "per_device_eval_batch_size": 2}
TIME = r"(?:\d+\.\d s|\d+ s|\d+m\d\ds|\d+h\d\dm)"
"""A duration as igea prints it: 4.1 s, 42 s, 2m58s, 1h02m."""
LINE = re.compile(r"^step (\d+)/6 \((\d+\.\d)%\)(.*) \| (.*) s/step  (.*) tok/s \| (.+), ETA (.+)$")


@pytest.fixture(scope="module")
def watched_run(tiny_model_dir, corpus_file, tmp_path_factory):
    """A run trained in a 'log file' (stderr is not a terminal under pytest) with a progress line due at every
    chance, the lines it logged, and the progress its status file heard."""
    from igea.status import StatusFile

    tmp = tmp_path_factory.mktemp("watched")
    cfg = make_config(tmp, tiny_model_dir, corpus_file, training=WATCHED, data={"validation_split": 16})
    handler = Collect()
    logging.getLogger("igea").addHandler(handler)
    heard: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("igea.progress.PROGRESS_SECONDS", 0.0)
        hear = StatusFile.heard
        patch.setattr(StatusFile, "heard", lambda self, line: (heard.append(line), hear(self, line)))
        logging.getLogger("igea").setLevel(logging.INFO)
        try:
            result = igea.train(cfg)
        finally:
            logging.getLogger("igea").removeHandler(handler)
    return result, handler.lines, heard


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_every_training_line_in_a_log_file_has_progress_speed_elapsed_and_eta(watched_run):
    _, lines, _ = watched_run
    training = [line for line in lines if LINE.match(line)]
    logged = [LINE.match(line) for line in training if "  loss " in line]
    assert [int(m.group(1)) for m in logged] == [2, 4, 6]
    between = [LINE.match(line) for line in training if "  loss " not in line]
    assert [int(m.group(1)) for m in between] == [1, 3, 5]  # a line at every step a log did not cover
    for match in logged + between:
        assert float(match.group(4)) > 0 and match.group(5)  # seconds per step, tokens per second
        assert re.fullmatch(TIME, match.group(6)) and re.fullmatch(TIME, match.group(7))
    assert float(logged[0].group(2)) == pytest.approx(100 * 2 / 6, abs=0.05)
    assert sum("each line's ETA counts" in line for line in lines) == 1


def test_evaluations_and_saves_announce_themselves_and_their_time(watched_run):
    result, lines, _ = watched_run
    blocks = result.metrics["data"]["validation"]["blocks"]
    starts = [line for line in lines if line.startswith("evaluating ") and "blocks" in line]
    assert starts == [f"evaluating the model before training: {blocks} blocks",
                      f"evaluating at step 3: {blocks} blocks", f"evaluating at step 6: {blocks} blocks"]
    assert sum(bool(re.fullmatch(rf"evaluated in {TIME}", line)) for line in lines) == 3
    batches = -(-blocks // WATCHED["per_device_eval_batch_size"])
    assert f"evaluating at step 3: 100% ({batches}/{batches} batches)" in " ".join(lines)
    for step in (3, 6):
        assert f"saving checkpoint-{step}" in lines
        assert any(re.fullmatch(rf"saved checkpoint-{step} \([\d.]+ [kM]B, {TIME}\)", line) for line in lines)


def test_the_status_file_hears_the_progress_of_reading_the_corpus_and_of_each_evaluation(watched_run):
    result, _, heard = watched_run
    assert any(line.startswith("abstracts: reading: ") for line in heard), heard
    for when in ("the model before training", "at step 3", "at step 6"):
        assert any(line.startswith(f"evaluating {when}: ") and " batches) | " in line for line in heard)
    assert run_status(result.output_dir)["work"] is None  # finished: no work left over from the last phase


def test_status_of_a_finished_run(watched_run, capsys):
    result, _, _ = watched_run
    status = run_status(result.output_dir)
    assert status["state"] == "finished" and status["step"] == 6 and status["max_steps"] == 6
    assert status["checkpoints"] == ["checkpoint-3", "checkpoint-6"]
    assert status["loss"]["step"] == 6 and status["loss"]["value"] == result.log_history[-3]["loss"]
    assert status["evaluation"] == {"step": 6, "loss": result.metrics["after"]["eval_loss"], "sets": {}}
    assert main(["status", str(result.output_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "finished"
    assert main(["status", str(result.output_dir)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{result.output_dir}: finished, step 6/6 (100.0%)\n") and "checkpoint-6" in text


@pytest.mark.parametrize(("stop", "state", "error"), [(KeyboardInterrupt, "interrupted", "stopped by Ctrl-C"),
                                                      (Interrupted, "failed", "Interrupted")])
def test_status_of_a_run_stopped_by_ctrl_c_or_by_an_error(stop, state, error, tiny_model_dir, corpus_file, tmp_path,
                                                          monkeypatch):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, training={**WATCHED, "eval_steps": 6})
    stop_after_each_checkpoint(monkeypatch, stop)
    with pytest.raises(stop):
        igea.train(cfg)
    status = run_status(cfg.output_dir)
    assert (status["state"], status["step"], status["error"]) == (state, 3, error)
    assert status["checkpoints"] == ["checkpoint-3"] and status["eta"] is None


def test_status_of_a_run_whose_process_died_and_of_a_directory_without_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (run / LOCK_FILE).write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    (run / STATUS_FILE).write_text(json.dumps({"phase": "training", "step": 7, "max_steps": 10, "eta": 30.0,
                                               "updated": time.time() - 5, "session_started": time.time() - 60}))
    status = run_status(run)
    assert status["state"] == "failed" and "ended without a word" in status["reason"] and status["step"] == 7
    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(IgeaError, match="is not a directory"):
        run_status(tmp_path / "missing")


@pytest.mark.slow
def test_status_of_a_live_run_started_in_another_process(tiny_model_dir, corpus_file, tmp_path, capsys):
    raw = config_dict(tmp_path / "live", tiny_model_dir, corpus_file)
    raw["training"].update(max_steps=40, logging_steps=1, eval_steps=40, save_steps=40)
    config = tmp_path / "live.yaml"
    config.write_text(yaml.safe_dump(raw))
    seen = []
    with open(tmp_path / "train.log", "w") as log:  # a log file, as a scheduler gives it
        process = subprocess.Popen([sys.executable, "-m", "igea", "train", str(config)], stdout=log, stderr=log)
        try:
            while process.poll() is None:
                try:
                    status = run_status(tmp_path / "live")
                except IgeaError:
                    continue  # not started yet
                if status["state"] == "running" and status.get("step"):
                    seen.append(status)
                time.sleep(0.1)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, (tmp_path / "train.log").read_text()
    assert seen, "never seen running with a step"
    live = seen[-1]
    assert live["pid"] == process.pid and live["max_steps"] == 40 and 0 < live["step"] <= 40
    assert live["since_update"] < 60 and live["elapsed"] > 0 and live["loss"] is not None
    assert all(s["step"] <= t["step"] for s, t in zip(seen, seen[1:], strict=False))
    finished = run_status(tmp_path / "live")
    assert finished["state"] == "finished" and finished["step"] == 40
    assert main(["status", str(tmp_path / "live")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'live'}: finished, step 40/40")


def test_held_out_evaluation_announces_each_model_and_set(tiny_model_dir, corpus_file, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="igea")
    results = igea.evaluate(str(tiny_model_dir), corpus={"abstracts": str(corpus_file)}, compare=str(tiny_model_dir),
                            block_size=64)
    said = [r.getMessage() for r in caplog.records]
    model, base = list(results["models"])
    blocks = results["held_out_data"]["blocks"]
    assert f"evaluating the model {model}" in said and f"evaluating the base model (compare) {base}" in said
    for name in (model, base):
        assert f"{name}: held-out set 'abstracts': {blocks} blocks" in said
        assert any(re.fullmatch(rf"evaluated {re.escape(name)} in {TIME}", line) for line in said)


def test_generating_many_prompts_reports_progress_in_a_log_file(tiny_model_dir, caplog, monkeypatch):
    monkeypatch.setattr("igea.progress.PROGRESS_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="igea")
    generator = igea.Generator.from_pretrained(str(tiny_model_dir), device="cpu")
    generator.complete(["Il fegato", "La fibrosi", "Il cuore"], batch_size=1, max_new_tokens=2)
    said = [r.getMessage() for r in caplog.records]
    assert "generating for 3 prompts in 3 batches of 1" in said
    assert [line.split(" |")[0] for line in said if line.startswith("generating: ") and "done" not in line] == [
        "generating: 33% (1/3 prompts)", "generating: 67% (2/3 prompts)", "generating: 100% (3/3 prompts)"]
    assert any(re.fullmatch(rf"generating: done in {TIME}", line) for line in said)


def test_the_documents_of_a_corpus_are_counted_or_estimated_for_its_progress(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"documento numero {i} " * (1 + i % 7) for i in range(3000)]
    table = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": texts}), table)
    assert estimated_documents([str(table)], None, None) == (3000, True)
    assert estimated_documents([str(table)], None, 100) == (100, True)
    lines = tmp_path / "a.txt"
    lines.write_text("\n".join(texts) + "\n")
    assert estimated_documents([str(lines)], None, None) == (3000, True)  # read whole: exact
    monkey = pytest.MonkeyPatch()
    monkey.setattr("igea.data.ESTIMATE_SAMPLE_BYTES", 20_000)
    try:
        total, exact = estimated_documents([str(lines), str(lines)], None, None)
    finally:
        monkey.undo()
    assert not exact and 6000 * 0.8 < total < 6000 * 1.2


def test_preparing_a_corpus_says_how_far_it_is_in_a_log_file(tiny_model_dir, corpus_file, tmp_path, caplog,
                                                              monkeypatch):
    monkeypatch.setattr("igea.progress.PROGRESS_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="igea")
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, data={"cache_dir": str(tmp_path / "cache")})
    igea.prepare_dataset(cfg)
    said = [r.getMessage() for r in caplog.records]
    documents = len(corpus_file.read_text(encoding="utf-8").splitlines())
    assert any(line.startswith("abstracts: tokenizing into blocks of 64 tokens") for line in said)
    assert f"abstracts: reading: 100% ({documents:,}/{documents:,} documents)" in " ".join(said)


API_SCRIPT = textwrap.dedent("""
    import igea
    cfg = igea.load_config({"model": {"tiny": {"vocab_size": 300}}, "data": {"path": "igea:general"},
                            "training": {"output_dir": %r}})
    model, tokenizer = igea.load_model(cfg)
    generator = igea.Generator.from_pretrained(%r)
    generator.generate(["Il fegato"], max_new_tokens=2)
    igea.evaluate(%r, corpus={"general": "igea:general"}, block_size=32)
""")


@pytest.mark.slow
def test_the_api_writes_no_progress_bar_into_a_pipe(tmp_path):
    run = tmp_path / "run"
    base = str(run / "base-model")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", API_SCRIPT % (str(run), base, base)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "Loading weights" not in done.stderr and "it/s" not in done.stderr


def test_progress_says_percent_elapsed_and_eta_before_a_gap_of_30_seconds(monkeypatch, caplog):
    from igea.progress import Progress, duration

    now = iter([0.0, 12.0, 24.0, 36.0, 48.0, 48.0])  # made, four units of 12 s each, closed
    monkeypatch.setattr("igea.progress.time.monotonic", lambda: next(now))
    caplog.set_level(logging.INFO)
    with Progress("reading", 8, "documents", logger=logging.getLogger("igea.test")) as progress:
        for _ in range(4):
            progress.update()
    said = [r.getMessage() for r in caplog.records]
    # at 24 s the next unit would end past 30 s without a line: the line comes then, and again 24 s later
    assert said == ["reading: 25% (2/8 documents) | 24 s, ETA 1m12s", "reading: 50% (4/8 documents) | 48 s, ETA 48 s",
                    "reading: done in 48 s"]
    assert [duration(s) for s in (0.04, 9.96, 42, 178, 3720, 147600)] == ["0.0 s", "10.0 s", "42 s", "2m58s",
                                                                         "1h02m", "1d17h"]


def test_the_status_file_is_kept_fresh_between_log_lines_and_during_an_evaluation(tmp_path, monkeypatch):
    # whatever prints the lines (a terminal's bar or a log file's lines): logging_steps may be thousands of steps
    import socket

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from igea.status import StatusFile
    from igea.tracking import TrainingClock

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to="none")
    state, control = TrainerState(max_steps=100, is_world_process_zero=True), TrainerControl()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # running
    clock = TrainingClock(block_size=8, flops_per_token=1.0, peak_flops=None, status=StatusFile(tmp_path))
    clock.on_train_begin(args, state, control)
    state.global_step = 1
    clock.on_step_end(args, state, control)
    clock.on_log(args, state, control, logs={"loss": 2.0})  # a log line: measured and written
    state.global_step = 2
    clock.on_step_end(args, state, control)  # too soon after the log line: nothing written
    assert run_status(tmp_path)["step"] == 1
    monkeypatch.setattr("igea.progress.PROGRESS_SECONDS", 0.0)
    clock.on_step_end(args, state, control)
    written = run_status(tmp_path)
    assert written["state"] == "running" and written["step"] == 2 and written["eta"] is not None
    assert written["loss"] == {"step": 1, "value": 2.0}
    before = json.loads((tmp_path / STATUS_FILE).read_text())["updated"]
    time.sleep(0.01)
    clock.on_prediction_step(args, state, control)  # a batch of a long evaluation
    assert json.loads((tmp_path / STATUS_FILE).read_text())["updated"] > before


@pytest.mark.parametrize("terminal", [False, True])
def test_long_work_is_heard_by_the_status_file_in_a_log_file_and_beside_a_bar(terminal, tmp_path, monkeypatch,
                                                                               caplog):
    # a benchmark after training, a corpus being read: `igea status` shows where it is, not a silent (hung?) run
    import socket

    from igea.progress import Progress, heard_by
    from igea.status import StatusFile, format_status

    monkeypatch.setattr("igea.progress.PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr("igea.progress.in_log_file", lambda: not terminal)
    caplog.set_level(logging.INFO)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # running
    status = StatusFile(tmp_path)
    status.update(phase="scoring the trained model on domande")
    with heard_by(status.heard), Progress("domande", 4, "batches", logger=logging.getLogger("igea.test")) as work:
        work.update()
        work.update()
    assert run_status(tmp_path)["work"].startswith("domande: 50% (2/4 batches) | ")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("domande: 50%")]
    assert len(logged) == (0 if terminal else 1)  # a terminal has the bar; a log file, the line as well
    text = format_status(run_status(tmp_path))
    assert "running (scoring the trained model on domande)" in text and "\n  domande: 50% (2/4 batches) | " in text
    with Progress("after", 2, "batches", logger=logging.getLogger("igea.test")) as work:
        work.update()  # heard by no one: the block has ended
    assert "after" not in run_status(tmp_path)["work"]
    status.update(phase="training")  # a new phase: the last one's work is no longer what the run does
    assert run_status(tmp_path)["work"] is None


def test_the_status_file_has_the_speed_and_eta_before_the_first_log_line(tmp_path, monkeypatch):
    # logging_steps: 5000 (the card's): hours before the first log line measures the speed
    import socket

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from igea.status import StatusFile
    from igea.tracking import TrainingClock

    clock = iter([0.0, 0.0, 2.0, 4.0])  # made, train begin, two steps of 2 s
    monkeypatch.setattr("igea.tracking.time.perf_counter", lambda: next(clock))
    monkeypatch.setattr("igea.progress.PROGRESS_SECONDS", 0.0)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # running
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to="none",
                             eval_strategy="no", save_strategy="no")
    state, control = TrainerState(max_steps=10, is_world_process_zero=True), TrainerControl()
    watch = TrainingClock(block_size=8, flops_per_token=1.0, peak_flops=None, status=StatusFile(tmp_path))
    watch.on_train_begin(args, state, control)
    for step in (1, 2):
        state.global_step = step
        watch.on_step_end(args, state, control)
    written = json.loads((tmp_path / STATUS_FILE).read_text())
    assert (written["step"], written["seconds_per_step"], written["tokens_per_second"]) == (2, 2.0, 8.0)
    assert written["eta"] == 8 * 2.0
    assert watch.steps == 2  # left open: the first log line still measures both steps


def test_status_into_a_pipe_whose_reader_has_left_ends_quietly(tmp_path):
    # `igea status RUN | head -1`, `| grep -q running`: no traceback on stderr
    run = tmp_path / "run"
    run.mkdir()
    (run / STATUS_FILE).write_text(json.dumps({"phase": "interrupted", "step": 3, "max_steps": 10}))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "igea", "status", str(run)], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == ""


def test_in_a_terminal_each_log_line_goes_above_the_bar_on_stderr_not_into_stdout(capsys):
    # `igea train c.yaml > results.txt` in a terminal: stdout holds the results, the log stays on the screen
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from igea.tracking import ReadableProgress, TrainingClock

    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    state, control = TrainerState(max_steps=10, global_step=2, is_world_process_zero=True), TrainerControl()
    bar = ReadableProgress(TrainingClock(block_size=8, flops_per_token=1.0, peak_flops=None))
    bar.on_train_begin(args, state, control)
    bar.on_log(args, state, control, logs={"loss": 2.5})
    bar.on_train_end(args, state, control)
    out, err = capsys.readouterr()
    assert "step 2/10 (20.0%)  loss 2.5" in err and "loss" not in out
