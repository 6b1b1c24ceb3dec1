"""A run directory's own files: what igea writes there, the markers of a started run, of a finished run and of
a complete checkpoint (with its files' checksums), atomic writes, and the guard that never lets a run replace,
or write into, something it should not. How a run uses them as it starts is `igea.runstart`.

igea deletes only what igea wrote: `--overwrite` removes the entries of IGEA_ENTRIES from a directory that holds
an igea run and refuses when anything else is there.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igea.errors import IgeaError

logger = logging.getLogger(__name__)

RUN_MARKER = "igea_run.json"
"""Written last, into the output directory of a finished run: config, versions, batch layout and metrics."""
START_MARKER = "igea_start.json"
"""Written when a run starts: the config it was started with and every later resume (what changed, when)."""
CHECKPOINT_MARKER = "igea_checkpoint.json"
"""Written into a checkpoint once all of it is on disk, with each file's size and checksum."""
BEFORE_METRICS = "eval_before.json"
"""The base model's held-out metrics, kept so that a resumed run reports the same 'before'."""
LOCK_FILE = "igea.lock"
"""Present while a run uses the directory: the owner's pid, host and start time."""
STATUS_FILE = "igea_status.json"
"""What the run is doing, kept up to date by its main process as it runs (read by `igea status`)."""
CHECKPOINT_PREFIX = "checkpoint-"
TINY_MARKER = "igea_tiny.json"
"""Written beside a tiny base model igea built (`<output_dir>/base-model`): its shape and corpus."""

IGEA_ENTRIES = (
    RUN_MARKER, START_MARKER, BEFORE_METRICS, LOCK_FILE, STATUS_FILE, "metrics.json", "log_history.json",
    "benchmarks.json", "README.md", "curves.png", f"{CHECKPOINT_PREFIX}*", "base-model*", ".final.tmp", "*.tmp", "runs",
    "merge.json", "merge.png",  # igea merge's results and plot, when it writes them into the run
    # what `save_pretrained` writes for a causal LM, its tokenizer and a peft adapter
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "training_args.bin", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "adapter", "adapter_config.json", "adapter_model.safetensors",
)
"""Top-level names igea (or the Trainer and `save_pretrained` it calls) writes into a run directory."""
IGNORED_ENTRIES = (".DS_Store", ".ipynb_checkpoints", "Thumbs.db")
"""What file browsers and notebooks leave behind: neither a reason to refuse a directory nor deleted."""


def write_text_atomic(path: Path, text: str, sync: bool = True) -> None:
    """Write to a temporary name, flush it to disk (`sync`), then rename: a reader (or a crash) never sees half a
    file. Without `sync` a reader still never sees half a file, but a crash of the machine may lose the write: for
    a file rewritten every few seconds, where the flush would cost more than the write (on a network disk, often
    tens of milliseconds)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def share_like_other_files(folder: Path) -> None:
    """Give the safetensors files under `folder` the mode every other file there gets (0644 under umask 022).

    safetensors writes a weight file as a temporary file renamed into place, which keeps the temporary file's
    mode 0600 whatever the umask: on a shared cluster, the colleagues who may read a run could not read its
    weights. Files of another mode are left as they are.
    """
    mask = os.umask(0)
    os.umask(mask)
    mode = 0o666 & ~mask
    for path in folder.rglob("*.safetensors"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600 != mode:
            path.chmod(mode)


def write_json_atomic(path: Path, payload: Any, sync: bool = True) -> None:
    """`payload` as indented UTF-8 JSON, written atomically (values JSON cannot hold become strings)."""
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n", sync)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The config a finished igea run was trained with (a plain dict); None for any other directory."""
    marker = Path(run_dir) / RUN_MARKER
    if not marker.is_file():
        return None
    return read_json(marker).get("config", {})


# ----------------------------------------------------------------------------------------------------------
# What a directory holds


@dataclass
class DirContents:
    """The top-level entries of an output directory, sorted by who wrote them."""

    igea: list[str]
    foreign: list[str]

    @property
    def is_run(self) -> bool:
        """The directory holds an igea run (started, finished, or from before start markers existed)."""
        return any(name in self.igea for name in (START_MARKER, RUN_MARKER, LOCK_FILE))


def dir_contents(output_dir: Path) -> DirContents:
    igea, foreign = [], []
    for entry in sorted(os.listdir(output_dir)):
        if entry in IGNORED_ENTRIES:
            continue
        (igea if any(fnmatch.fnmatchcase(entry, pattern) for pattern in IGEA_ENTRIES) else foreign).append(entry)
    return DirContents(igea, foreign)


def _some(names: list[str], n: int = 4) -> str:
    shown = ", ".join(f"'{name}'" for name in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


RESUME_AUTO = "auto"
"""`resume="auto"` (`--resume=auto`): continue the run in output_dir when there is one, else start it (a scheduler
that requeues the same command)."""


def check_resume(resume: bool | str) -> None:
    """`resume` is False, True (the directory must hold a run: a typo in its path is an error) or "auto"."""
    if resume not in (False, True, RESUME_AUTO) or not isinstance(resume, (bool, str)):
        raise IgeaError(f"resume: {resume!r} is not allowed; use True (continue the run in output_dir), False, or "
                        f"'{RESUME_AUTO}' (continue it when there is one, else start it)")


def check_output_dir(output_dir: Path, resume: bool | str, overwrite: bool) -> None:
    """Refuse a directory igea must not write into or must not replace; nothing is changed here.

    A new or empty directory is fine, unless `resume` is True: there is no run to continue there (a typo in the
    path), which is an error rather than a new run (`resume="auto"` starts one). A directory that is not an igea
    run is refused whatever the flags. An igea run: a finished one needs `overwrite`; an unfinished one with a
    complete checkpoint needs `resume` or `overwrite`; `overwrite` refuses when anything igea did not write is
    there.
    """
    if not output_dir.exists():
        if resume is True:
            raise IgeaError(_no_run_to_resume(output_dir, "it does not exist"))
        return
    if not output_dir.is_dir():
        raise IgeaError(f"training.output_dir: '{output_dir}' is a file, not a directory")
    contents = dir_contents(output_dir)
    if not contents.igea and not contents.foreign:
        if resume is True:
            raise IgeaError(_no_run_to_resume(output_dir, "it is empty"))
        return
    built_by_igea = (output_dir / "base-model" / TINY_MARKER).is_file()  # igea.load_model(cfg) before a run
    if not contents.is_run and not built_by_igea and not complete_checkpoints(output_dir):
        raise IgeaError(
            f"training.output_dir: '{output_dir}' is not empty and holds no igea run "
            f"({_some(contents.foreign or contents.igea)}); igea writes only into a new or empty directory or one "
            "of its own runs: choose another output_dir"
        )
    if overwrite:
        if contents.foreign:
            raise IgeaError(
                f"training.output_dir: '{output_dir}' holds files igea did not write ({_some(contents.foreign)}); "
                "overwrite removes only what igea wrote: move them elsewhere first"
            )
        return
    if (output_dir / RUN_MARKER).is_file():
        if resume:
            raise IgeaError(f"training.output_dir: '{output_dir}' holds a finished run; there is nothing to resume")
        raise IgeaError(
            f"training.output_dir: '{output_dir}' holds a finished run; use --overwrite (Python: overwrite=True) "
            "to replace it, or choose another output_dir"
        )
    if not resume and complete_checkpoints(output_dir):
        raise IgeaError(
            f"training.output_dir: '{output_dir}' holds checkpoints of an unfinished run; use --resume "
            "(Python: resume=True) to continue it, or --overwrite to start again"
        )
    if resume is True and START_MARKER not in contents.igea and not complete_checkpoints(output_dir):
        raise IgeaError(_no_run_to_resume(output_dir, f"it holds no {START_MARKER} nor checkpoint"))


def _no_run_to_resume(output_dir: Path, why: str) -> str:
    return (f"--resume: '{output_dir}' holds no run to continue ({why}); check training.output_dir, or use "
            f"--resume={RESUME_AUTO} (Python: resume=\"{RESUME_AUTO}\") to start a run there when there is none")


def remove_igea_files(output_dir: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Delete what igea wrote into `output_dir` (IGEA_ENTRIES), except `keep`; return the names removed.

    Call it only after `check_output_dir` accepted the directory for overwriting.
    """
    removed = []
    for name in dir_contents(output_dir).igea:
        if name in keep:
            continue
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    if removed:
        logger.info("removed the previous run's files from %s: %s", output_dir, ", ".join(removed))
    return removed


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: completion marker with checksums, verification, rotation


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(CHECKPOINT_PREFIX))


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()]
    return sorted(found, key=checkpoint_step)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints that hold igea's completion marker, oldest first (not yet verified)."""
    return [p for p in _checkpoint_dirs(output_dir) if (p / CHECKPOINT_MARKER).is_file()]


def file_checksum(path: Path) -> str:
    """A fast non-cryptographic checksum of a file's bytes (xxh3-64, which datasets already depends on)."""
    import xxhash

    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a checkpoint (but the marker) with its size and checksum, by path relative to it."""
    return {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "xxh3": file_checksum(path)}
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != CHECKPOINT_MARKER
    }


def mark_checkpoint_complete(folder: Path, extra: dict[str, Any]) -> None:
    """Write the completion marker of a checkpoint whose files are all on disk."""
    write_json_atomic(folder / CHECKPOINT_MARKER, {**extra, "files": checkpoint_files(folder)})


def checkpoint_problem(folder: Path) -> str | None:
    """Why a marked checkpoint cannot be trusted (a file missing, resized or changed), or None when it can."""
    try:
        recorded = read_json(folder / CHECKPOINT_MARKER).get("files")
    except (OSError, ValueError, AttributeError):
        return f"its {CHECKPOINT_MARKER} is unreadable"
    if recorded is None:
        return None  # marked by an igea version that recorded no checksums
    for name, expected in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size:,} bytes, {expected['size']:,} when it was saved"
        if file_checksum(path) != expected["xxh3"]:
            return f"{name} changed since it was saved (checksum differs)"
    return None


def last_complete_checkpoint(output_dir: Path, verify: bool = True) -> Path | None:
    """The newest checkpoint that was written to the end and, with `verify`, whose files are as they were saved.

    A damaged checkpoint is skipped with a warning naming the file, and the one before it is tried.
    """
    for folder in reversed(complete_checkpoints(output_dir)):
        problem = checkpoint_problem(folder) if verify else None
        if problem is None:
            return folder
        logger.warning("%s cannot be resumed from: %s; trying the checkpoint before it", folder.name, problem)
    return None


def rotate_checkpoints(output_dir: Path, keep: int | None, protect: tuple[Path, ...] = ()) -> None:
    """Keep the newest `keep` complete checkpoints (and `protect`), delete older checkpoints.

    Runs after the newest checkpoint's marker is written, so a complete checkpoint always exists on disk.
    """
    if not keep or keep <= 0:
        return
    complete = complete_checkpoints(output_dir)
    kept = set(complete[-keep:]) | {Path(p) for p in protect}
    newest = checkpoint_step(complete[-1]) if complete else -1
    for folder in _checkpoint_dirs(output_dir):
        if folder not in kept and checkpoint_step(folder) < newest:
            logger.info("deleting %s (training.save_total_limit: %d)", folder.name, keep)
            shutil.rmtree(folder, ignore_errors=True)


def remove_checkpoints_after(output_dir: Path, checkpoint: Path) -> None:
    """Delete checkpoints newer than the one a run resumes from: they are incomplete or damaged, and training
    writes those steps again."""
    for folder in _checkpoint_dirs(output_dir):
        if checkpoint_step(folder) > checkpoint_step(checkpoint):
            logger.warning("deleting %s: it is incomplete or damaged; training continues from %s", folder.name,
                           checkpoint.name)
            shutil.rmtree(folder)


def process_alive(pid: int) -> bool:
    """Whether a process of this host still runs (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
