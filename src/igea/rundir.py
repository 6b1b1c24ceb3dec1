"""A run directory's own files: the markers of a finished run and of a complete checkpoint, atomic writes,
and the guard that never lets a new run replace a finished or interrupted one by accident.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from igea.errors import IgeaError

RUN_MARKER = "igea_run.json"
"""Written last, into the output directory of a finished run: config, versions, batch layout and metrics."""
CHECKPOINT_MARKER = "igea_checkpoint.json"
"""Written into a checkpoint once all of it is on disk; a checkpoint without it is never resumed from."""
BEFORE_METRICS = "eval_before.json"
"""The base model's held-out metrics, kept so that a resumed run reports the same 'before'."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a reader (or a crash) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    """`payload` as indented UTF-8 JSON, written atomically (values JSON cannot hold become strings)."""
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The config a finished igea run was trained with (a plain dict); None for any other directory."""
    marker = Path(run_dir) / RUN_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8")).get("config", {})


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Never replace a finished run or an interrupted one unless asked to (`overwrite` / `resume`)."""
    if not output_dir.exists():
        return
    if output_dir.is_file():
        raise IgeaError(f"training.output_dir: '{output_dir}' is a file, not a directory")
    if overwrite:
        shutil.rmtree(output_dir)
        return
    if (output_dir / RUN_MARKER).is_file():
        raise IgeaError(
            f"training.output_dir: '{output_dir}' holds a finished run; pass --overwrite to replace it "
            "or choose another output_dir"
        )
    if any(output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")) and not resume:
        raise IgeaError(
            f"training.output_dir: '{output_dir}' holds checkpoints of an unfinished run; pass --resume to "
            "continue it or --overwrite to start again"
        )


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest `checkpoint-N` that was written to the end (it holds igea's completion marker)."""
    complete = [
        p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if p.name.split("-")[-1].isdigit() and (p / CHECKPOINT_MARKER).is_file()
    ]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)
