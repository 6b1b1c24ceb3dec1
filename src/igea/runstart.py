"""How a run starts in its output directory: the guard checked, the directory locked for this run alone, and the
start planned (afresh, or from the newest verified checkpoint with an honest record of what changed).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igea.config import changed_settings
from igea.errors import IgeaError, show
from igea.progress import human_size
from igea.rundir import (
    LOCK_FILE,
    RESUME_AUTO,
    START_MARKER,
    STATUS_FILE,
    check_output_dir,
    complete_checkpoints,
    last_complete_checkpoint,
    process_alive,
    read_json,
    remove_checkpoints_after,
    remove_igea_files,
    write_json_atomic,
)
from igea.status import StatusFile

logger = logging.getLogger(__name__)


@dataclass
class RunStart:
    """How a run begins, decided by the main process once the directory is locked.

    `checkpoint` is the verified checkpoint to resume from (None: from the beginning); `changes` the training
    settings that differ from the ones the run started with (allowed on purpose); `new_dir` says the directory
    was missing or empty, so a run that fails before it begins can leave nothing behind.
    """

    output_dir: Path
    config: dict[str, Any]
    checkpoint: Path | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    new_dir: bool = False
    begun: bool = False
    opened: float = field(default_factory=time.time)
    status: StatusFile | None = None  # the main process's: `igea status` reads what the run is doing

    def begin(self, versions: dict[str, str], keep: tuple[str, ...] = ()) -> None:
        """Just before training changes anything: a new run clears what an earlier run of this directory left
        (igea's files only, but `keep`) and records its config; a resumed run records the resume."""
        if self.checkpoint is None:
            remove_igea_files(self.output_dir, keep=(LOCK_FILE, STATUS_FILE, *keep))
            write_json_atomic(self.output_dir / START_MARKER, {"config": self.config, "started": _now(),
                                                               "versions": versions, "resumes": []})
        else:
            remove_checkpoints_after(self.output_dir, self.checkpoint)
            record = start_record(self.output_dir)
            record.setdefault("resumes", []).append(
                {"at": _now(), "from": self.checkpoint.name, "changes": {k: list(v) for k, v in self.changes.items()}}
            )
            write_json_atomic(self.output_dir / START_MARKER, record)
        self.begun = True

    def abandon(self) -> None:
        """The run failed before it began: a directory that was new is left as it was (empty or absent)."""
        if self.begun or not self.new_dir or not self.output_dir.is_dir():
            return
        self.status = None  # nothing is left to report on
        remove_igea_files(self.output_dir, keep=(LOCK_FILE,))
        (self.output_dir / LOCK_FILE).unlink(missing_ok=True)
        if not os.listdir(self.output_dir):
            self.output_dir.rmdir()


def plan_run(config: dict[str, Any], output_dir: Path, resume: bool | str, overwrite: bool,
             allow_config_change: bool) -> RunStart:
    """With the directory locked (and checked again, now that no other run can start): pick the checkpoint to
    resume from and compare the config with the one the run started with. Writes nothing.

    `resume` True continues the run in the directory (`check_output_dir` refused a directory with none); a run
    that saved no complete checkpoint yet starts again from the beginning. "auto" does the same, and starts a new
    run where there is none."""
    check_output_dir(output_dir, resume=resume, overwrite=overwrite)
    new_dir = not any(entry != LOCK_FILE for entry in os.listdir(output_dir))
    checkpoint = verified_checkpoint(output_dir) if resume else None
    if resume and checkpoint is None:
        if new_dir or not (output_dir / START_MARKER).is_file() and not complete_checkpoints(output_dir):
            logger.info("--resume=%s: %s holds no run yet, starting one", RESUME_AUTO, output_dir)
        else:
            logger.warning("--resume: the run in %s has no complete checkpoint to continue from (it stopped before "
                           "its first one was saved, or each is damaged): starting it again from the beginning",
                           output_dir)
        return RunStart(output_dir, config, new_dir=new_dir)
    if checkpoint is None:
        return RunStart(output_dir, config, new_dir=new_dir)
    started = start_record(output_dir).get("config")
    changes = changed_settings(started, config) if started else {}
    if changes and not allow_config_change:
        listed = "; ".join(f"{key}: {show(old)} -> {show(new)}" for key, (old, new) in list(changes.items())[:6])
        raise IgeaError(
            f"--resume: the config differs from the one this run was started with ({listed}); resume with the "
            "original settings, or add --allow-config-change (Python: allow_config_change=True) to continue with "
            "the new ones on purpose (the run's record keeps both)"
        )
    logger.info("resuming from %s", checkpoint)
    return RunStart(output_dir, config, checkpoint, changes)


def verified_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files are as they were saved (`last_complete_checkpoint`), saying
    what it does meanwhile: which checkpoint, how big, and the seconds its checksums took."""
    candidates = complete_checkpoints(output_dir)
    if not candidates:
        return None
    files = [p for p in candidates[-1].rglob("*") if p.is_file()]
    logger.info("verifying %s (%s in %d files) against the checksums saved with it", candidates[-1].name,
                human_size(sum(p.stat().st_size for p in files)), len(files))
    started = time.perf_counter()
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is not None:
        logger.info("%s verified in %.1f s", checkpoint.name, time.perf_counter() - started)
    return checkpoint


def start_record(output_dir: Path) -> dict[str, Any]:
    """What `igea_start.json` says: the config the run started with, and its resumes (empty for runs an older
    igea started)."""
    path = output_dir / START_MARKER
    if not path.is_file():
        logger.warning("%s has no %s (an older igea started it): its starting config is unknown", output_dir,
                       START_MARKER)
        return {}
    return read_json(path)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# ----------------------------------------------------------------------------------------------------------
# One run per directory


class RunLock:
    """`output_dir/igea.lock`, created exclusively: a second run on the same directory is refused at once.

    A lock left by a process that no longer runs on this host is stale: it is taken over, with a log line. A lock
    held from another host cannot be checked; the error says how to remove it when that run is surely gone.
    Locks are re-entrant within a process (`igea.run` holds it across `igea.train`).
    """

    _held: dict[Path, int] = {}

    def __init__(self, output_dir: Path) -> None:
        self.path = (output_dir / LOCK_FILE).resolve()

    def __enter__(self) -> RunLock:
        if self._held.get(self.path, 0) == 0:
            self._acquire()
        self._held[self.path] = self._held.get(self.path, 0) + 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._held[self.path] -= 1
        if self._held[self.path] == 0:
            del self._held[self.path]
            self.path.unlink(missing_ok=True)

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._is_stale(holder):
                    raise IgeaError(self._busy_message(holder)) from None
                logger.warning("%s: taking over the lock of process %s, which no longer runs", self.path.parent,
                               holder.get("pid"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(owner, f)
            return
        raise IgeaError(f"training.output_dir: could not lock '{self.path.parent}' (another run keeps taking it)")

    def _holder(self) -> dict[str, Any]:
        try:
            holder = read_json(self.path)
        except (OSError, ValueError):
            return {}  # being written right now, or damaged: treated as held, checked again next time
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _is_stale(holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        return not process_alive(holder["pid"])

    def _busy_message(self, holder: dict[str, Any]) -> str:
        who = (f"process {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
               if holder else "another process")
        hint = ("; if that run is gone (e.g. its machine was lost), delete the lock file and retry"
                if holder.get("host") not in (None, socket.gethostname()) else "")
        return (f"training.output_dir: '{self.path.parent}' is in use by another igea run ({who}); wait for it "
                f"to end or choose another output_dir{hint}: {self.path}")
