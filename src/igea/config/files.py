"""Files a config names: local paths told from hub ids, globs and directories expanded into files, the corpora
and presets shipped inside igea, and a model directory's tokenizer files.

Checked at load so that a missing or empty file is one `ConfigError` naming its key, not an error deep in the
run.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from igea.errors import ConfigError, show

SAMPLE_CORPUS = "igea:sample"
"""`data.path` value that names the Italian biomedical sample corpus shipped inside the package."""
GENERAL_TEXT = "igea:general"
"""A corpus value that names the general (not medical) Italian held-out text shipped inside the package: everyday
sentences, to see what continued pretraining on a domain costs the model elsewhere."""
GENERAL_ENGLISH = "igea:general-en"
"""The same for everyday English (as large, nothing medical): a base trained on English too keeps it or loses it."""
SHIPPED_CORPORA = {SAMPLE_CORPUS: "sample_corpus.txt", GENERAL_TEXT: "general_italian.txt",
                   GENERAL_ENGLISH: "general_english.txt"}
HELD_OUT_TEXTS = (GENERAL_TEXT, GENERAL_ENGLISH)
"""Shipped texts meant as held-out sets: a few thousand tokens each, too small to train on (replay repeats them)."""

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".gz", ".zst", ".bz2", ".xz")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
"""A model directory with a tokenizer holds at least one of these; a bare checkpoint of a trainer holds none."""


def has_tokenizer_files(directory: str | Path) -> bool:
    """Does a model directory hold a tokenizer (checked before loading, whose own error is cut off)?"""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def no_tokenizer(directory: str) -> str:
    """The words for a directory without tokenizer files."""
    return f"directory '{directory}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)})"


def looks_local(path: str) -> bool:
    """True when a string names a local path rather than a hub id (`owner/name`, or a bare `name`).

    A bare name with a file suffix (`corpus.tx`, a typo of `corpus.txt`) is a local file that does not exist,
    not a hub id: hub ids without an owner name canonical datasets, which have no suffix.
    """
    return (
        path.startswith((".", "/", "~"))
        or path.lower().endswith(LOCAL_SUFFIXES)
        or any(ch in path for ch in "*?[")
        or os.path.exists(path)
        or path.count("/") > 1
        or ("/" not in path and re.search(r"\.[A-Za-z0-9]{1,5}$", path) is not None)
    )


def resolve_local_files(paths: str | list[str], key: str) -> list[str] | None:
    """Expand local paths, globs and directories into files; None when `paths` is a hub id.

    Raises a ConfigError naming `key` when a local path matches no file.
    """
    items = [paths] if isinstance(paths, str) else list(paths)
    if not items:
        raise ConfigError(f"{key}: [] names no file; give a file, a list of files, a glob or a directory")
    if len(items) == 1 and items[0] in SHIPPED_CORPORA:
        return [shipped_corpus_path(items[0])]
    if len(items) == 1 and not looks_local(items[0]):
        return None
    files: list[str] = []
    for item in items:
        expanded = os.path.expanduser(item)
        if os.path.isdir(expanded):
            inside = sorted(
                str(p) for p in Path(expanded).rglob("*") if p.is_file() and p.name.lower().endswith(LOCAL_SUFFIXES)
            )
            if not inside:
                raise ConfigError(f"{key}: directory '{item}' holds no .txt, .jsonl, .parquet or .csv file")
            files.extend(inside)
            continue
        matches = sorted(glob.glob(expanded))
        if not matches:
            where = "" if os.path.isabs(expanded) else f" (relative to the current directory, {os.getcwd()})"
            raise ConfigError(f"{key}: no file matches '{item}'{where}")
        broken = next((m for m in matches if os.path.islink(m) and not os.path.exists(m)), None)
        if broken is not None:
            raise ConfigError(f"{key}: '{broken}' is a symbolic link to '{os.readlink(broken)}', which does not exist")
        if not any(os.path.isfile(m) for m in matches):
            raise ConfigError(f"{key}: '{item}' matches no file")
        files.extend(m for m in matches if os.path.isfile(m))
    return files


PRESETS_DIR = Path(__file__).parents[1] / "configs"
"""The configs shipped with igea (the repository's `configs/` links here)."""


def preset(name: str) -> Path:
    """The path of a config shipped with igea: `demo`, `igea-350m`, `igea-1b` or `igea-3b`.

    >>> cfg = load_config(preset("demo"), "training.max_steps=20")
    """
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"preset: {show(name)} is not a config shipped with igea; choose one of {names}")
    return path


def sample_corpus_path() -> str:
    """Path of the sample corpus shipped with the package."""
    return shipped_corpus_path(SAMPLE_CORPUS)


def shipped_corpus_path(name: str) -> str:
    """Path of a text shipped with the package: `igea:sample`, `igea:general` or `igea:general-en`."""
    return str(Path(__file__).parents[1] / "resources" / SHIPPED_CORPORA[name])


def check_corpus_files(paths: str | list[str], key: str) -> None:
    """A corpus setting names files that exist and are not all empty (a hub id is checked when it is loaded)."""
    files = resolve_local_files(paths, key)
    if files and all(os.path.getsize(f) == 0 for f in files):
        where = f"'{files[0]}' is empty" if len(files) == 1 else f"all {len(files)} files are empty"
        raise ConfigError(f"{key}: {where}; a corpus needs text")
