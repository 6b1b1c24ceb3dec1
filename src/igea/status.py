"""What a run is doing or did, readable from another shell: `igea status RUN_DIR`.

While it runs, the main process keeps `igea_status.json` in the run directory up to date (at every log line,
each evaluation and each save, and at least every PROGRESS_SECONDS while it trains or evaluates): the phase,
the step, the speed, the elapsed time and ETA, the last training loss and the last evaluation of each held-out
set, and when it last said anything.
`run_status` reads it with the run's other files (the lock and its holder, the markers of a finished run and
of complete checkpoints) and tells running, finished, interrupted or failed; it only reads, so it never
disturbs the run, whatever its rank layout (only the main process writes).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

from igea.errors import IgeaError
from igea.progress import count, duration
from igea.rundir import (
    LOCK_FILE,
    RUN_MARKER,
    START_MARKER,
    STATUS_FILE,
    complete_checkpoints,
    process_alive,
    read_json,
    write_json_atomic,
)

QUIET_AFTER = 600.0
"""A running run whose status file is older than this may be hung (it is rewritten at least every 30 s while the
run trains or evaluates)."""


class StatusFile:
    """`igea_status.json` of a running run, rewritten (atomically) by the main process as the run goes."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / STATUS_FILE
        now = time.time()
        self.record: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "session_started": now,
                                       "updated": now, "phase": "starting"}

    def update(self, **fields: Any) -> None:
        """Merge `fields` into the record and write it, stamped with the time; a new phase drops the last phase's
        `work`."""
        if fields.get("phase", self.record["phase"]) != self.record["phase"]:
            self.record.pop("work", None)
        self.record.update(fields, updated=time.time())
        with contextlib.suppress(OSError):  # a full disk must not stop the run here: the run says so itself
            write_json_atomic(self.path, self.record, sync=False)  # rewritten often: atomic, not flushed

    def heard(self, line: str) -> None:
        """Where a piece of long work is (`reading: 45% (...) | 1m20s, ETA 1m38s`): a sign of life (igea.progress)."""
        self.update(work=line)

    def ended(self, phase: str, **fields: Any) -> None:
        """The session ended: finished, interrupted or failed (with `error`)."""
        self.update(phase=phase, eta=None, **fields)


# ----------------------------------------------------------------------------------------------------------
# Reading


def run_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The state of the run in `run_dir` (running / finished / interrupted / failed), with its progress.

    Never writes: the run is not disturbed. Raises IgeaError when `run_dir` holds no igea run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IgeaError(f"status: '{run_dir}' is not a directory")
    record = _read(run_dir / STATUS_FILE)
    lock = _read(run_dir / LOCK_FILE) if (run_dir / LOCK_FILE).exists() else None
    finished = _read(run_dir / RUN_MARKER) if (run_dir / RUN_MARKER).is_file() else None
    if not record and lock is None and finished is None and not (run_dir / START_MARKER).is_file():
        raise IgeaError(f"status: '{run_dir}' holds no igea run (no {STATUS_FILE}, {LOCK_FILE} or {RUN_MARKER})")
    now = time.time()
    status: dict[str, Any] = {"run_dir": str(run_dir), **{k: record.get(k) for k in (
        "phase", "step", "max_steps", "epoch", "seconds_per_step", "tokens_per_second", "loss", "evaluation",
        "work", "host", "pid")}}
    status["state"], status["reason"] = _state(lock, finished, record)
    if finished is not None and status["state"] == "finished":
        status.update(_finished(finished, status))
    updated = record.get("updated")
    status["since_update"] = now - updated if updated else None
    started = record.get("session_started")
    if status["state"] == "running":
        status["elapsed"] = now - started if started else None
        eta = record.get("eta")
        status["eta"] = max(0.0, eta - (now - updated)) if eta is not None and updated else None
    else:
        status["elapsed"] = (updated - started) if started and updated else record.get("elapsed")
        status["eta"] = None
    if status.get("step") is not None and status.get("max_steps"):
        status["percent"] = 100 * status["step"] / status["max_steps"]
    status["checkpoints"] = [p.name for p in complete_checkpoints(run_dir)]
    status["error"] = record.get("error")
    return status


def _read(path: Path) -> dict[str, Any]:
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return {}  # absent, or being replaced this very moment
    return value if isinstance(value, dict) else {}


def _state(lock: dict[str, Any] | None, finished: dict[str, Any] | None,
           record: dict[str, Any]) -> tuple[str, str | None]:
    """(state, why) from the lock's holder, the finished-run marker and the last phase the run wrote."""
    if lock is not None:
        pid, host = lock.get("pid"), lock.get("host")
        if not lock:
            return "running", None  # the lock is being written this very moment
        if host != socket.gethostname():
            return "running", f"on host {host} (its process cannot be checked from here)"
        if isinstance(pid, int) and process_alive(pid):
            return "running", None
        return "failed", f"its process ({pid}) ended without a word (killed, or its machine lost?)"
    if finished is not None:
        return "finished", None
    phase = record.get("phase")
    if phase in ("interrupted", "failed"):
        return phase, record.get("error")
    return "failed", "it ended without a word (killed, or its machine lost?)"


def _finished(marker: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """Step and last evaluation of a finished run, from its marker (a run igea finished before the status file
    existed has no other record)."""
    metrics = marker.get("metrics") or {}
    train = metrics.get("train") or {}
    found: dict[str, Any] = {}
    if status.get("step") is None and train.get("global_step") is not None:
        found["step"] = found["max_steps"] = train["global_step"]
    if status.get("evaluation") is None and metrics.get("after"):
        found["evaluation"] = evaluation_record(status.get("step") or found.get("step"), metrics["after"])
    return found


def evaluation_record(step: int | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """An evaluation as the status keeps it: the step, and the loss of all sets and of each named set."""
    sets = {key.removeprefix("eval_").removesuffix("_loss"): value for key, value in metrics.items()
            if key.startswith("eval_") and key.endswith("_loss") and key != "eval_loss"}
    return {"step": step, "loss": metrics.get("eval_loss"), "sets": sets}


def format_status(status: dict[str, Any]) -> str:
    """`igea status` as a person reads it: the state and step on the first line, then what is known."""
    step, total = status.get("step"), status.get("max_steps")
    where = ""
    if step is not None:
        where = f", step {step:,}" + (f"/{total:,} ({status['percent']:.1f}%)" if total else "")
    state = status["state"]
    phase = status.get("phase")
    doing = f" ({phase})" if state == "running" and phase not in (None, "training") else ""
    lines = [f"{status['run_dir']}: {state}{doing}{where}"]
    if status.get("reason"):
        lines.append(f"  {status['reason']}")
    times = []
    if status.get("elapsed") is not None:
        times.append(f"elapsed {duration(status['elapsed'])}")
    if status.get("eta") is not None:
        times.append(f"ETA {duration(status['eta'])}")
    if status.get("seconds_per_step") is not None:
        times.append(f"{status['seconds_per_step']:.3g} s/step")
    if status.get("tokens_per_second") is not None:
        times.append(f"{count(status['tokens_per_second'])} tok/s")
    if status.get("since_update") is not None and state == "running":
        quiet = status["since_update"]
        times.append(f"last line {duration(quiet)} ago" + ("  <- no sign of life for a while: hung?"
                                                           if quiet > QUIET_AFTER else ""))
    if times:
        lines.append("  " + ", ".join(times))
    if status.get("work") and state == "running":
        lines.append(f"  {status['work']}")
    if status.get("loss"):
        lines.append(f"  training loss {status['loss']['value']:.4g} at step {status['loss']['step']:,}")
    evaluation = status.get("evaluation")
    if evaluation and evaluation.get("loss") is not None:
        per_set = "".join(f", {name} {loss:.4f}" for name, loss in evaluation.get("sets", {}).items())
        at = f" at step {evaluation['step']:,}" if evaluation.get("step") is not None else ""
        lines.append(f"  held-out loss{at}: {evaluation['loss']:.4f}" + (f" (all{per_set})" if per_set else ""))
    if status.get("error"):
        lines.append(f"  error: {status['error']}")
    kept = status.get("checkpoints") or []
    lines.append(f"  checkpoints: {', '.join(kept)}" if kept else "  checkpoints: none yet")
    if state == "interrupted" and kept:
        lines.append(f"  continue with: igea train CONFIG --resume (from {kept[-1]})")
    return "\n".join(lines)
