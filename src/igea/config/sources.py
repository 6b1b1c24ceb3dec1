"""The `data:` section: one corpus (`data.path`) or a weighted mixture (`data.sources`), the settings by which it
becomes blocks of token ids, its held-out sets, and the names its sources and held-out sets go by in metrics,
logs and the card.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import ClassVar

from igea.config.files import SHIPPED_CORPORA, check_corpus_files, looks_local
from igea.config.schema import Section, _at_least, _choice
from igea.errors import ConfigError, show

MIX_MODES = {
    "primary": "an epoch is one pass over the first source; the others are drawn by weight and start over when "
               "they run out",
    "all_exhausted": "an epoch ends once every source has been seen whole; the others start over meanwhile",
    "first_exhausted": "an epoch ends when the first source to run out does: no source repeats, the others are "
                       "seen in part",
}
"""`data.mix`: what an epoch of weighted `data.sources` is (`data.token_budget` sizes the mixture instead)."""


@dataclass
class SourceConfig(Section):
    """One corpus in a weighted mixture (`data.sources`)."""

    KEY: ClassVar[str] = "data.sources[]"

    path: str | list[str]
    weight: float = 1.0
    text_column: str | None = None
    name: str | None = None  # a hub dataset's configuration (as `load_dataset(path, name)`)
    split: str = "train"
    label: str | None = None  # the source's name in metrics, logs and the card (default: its name or file)
    max_documents: int | None = None  # read at most this many of its documents (default: data.max_documents)
    max_tokens: int | None = None  # read at most this many of its tokens: a large corpus (the hub's) drawn in part


@dataclass
class DataConfig(Section):
    """Where the corpus comes from and how it becomes fixed-length blocks of token ids."""

    KEY: ClassVar[str] = "data"

    path: str | list[str] | None = None
    sources: list[SourceConfig] | None = field(default_factory=list)  # null (entries commented out): see check
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    text_column: str = "text"
    label: str | None = None  # the corpus' name in metrics, logs and the card (default: its file or dataset name)
    validation_path: str | list[str] | dict[str, str | list[str]] | None = None
    validation_split: float | int = 0.05
    max_documents: int | None = None
    min_chars: int = 1
    encoding_errors: str = "strict"
    block_size: int = 2048
    document_boundary: str = "eos"
    packing: str = "blocks"
    mix: str = "primary"  # with several sources: what an epoch of the mixture is (see MIX_MODES)
    streaming: bool = False
    token_budget: int | None = None
    shuffle_buffer: int = 10000
    num_proc: int | None = None
    cache_dir: str | None = None
    seed: int | None = None

    def check(self) -> None:
        _choice(self, "encoding_errors", ("strict", "replace", "ignore"))
        _choice(self, "document_boundary", ("eos", "special_tokens"))
        _choice(self, "packing", ("blocks", "documents"))
        _choice(self, "mix", tuple(MIX_MODES))
        if self.sources is None:  # `sources:` with every entry commented out
            if self.path is None:
                raise ConfigError("data.sources is empty: list at least one source (path, weight), or set data.path")
            self.sources = []
        if self.path is not None and self.sources:
            raise ConfigError("data: set either 'data.path' or 'data.sources', not both")
        for key, paths in [("data.path", self.path), *validation_paths(self).items()] + [
            (f"data.sources[{i}].path", s.path) for i, s in enumerate(self.sources)
        ]:
            if paths is not None:
                check_corpus_files(paths, key)
        source_names(self)  # each a distinct identifier
        held_out_set_names(self)
        _at_least(self, "block_size", 2)
        for i, source in enumerate(self.sources):
            if source.weight <= 0:
                raise ConfigError(f"data.sources[{i}].weight: {show(source.weight)} is not allowed; it must be "
                                  "greater than 0")
            if source.max_documents is not None and source.max_documents < 1:
                raise ConfigError(f"data.sources[{i}].max_documents: {show(source.max_documents)} is not allowed; "
                                  "it must be at least 1")
            if source.max_tokens is not None and source.max_tokens < self.block_size:
                raise ConfigError(f"data.sources[{i}].max_tokens: {show(source.max_tokens)} is not allowed; it must "
                                  f"be at least data.block_size ({self.block_size}): a source gives whole blocks")
        _at_least(self, "shuffle_buffer", 1)
        vs = self.validation_split
        if isinstance(vs, float) and not 0 <= vs < 1 or isinstance(vs, int) and vs < 0:
            raise ConfigError(
                f"data.validation_split: {show(vs)} is not allowed; use a fraction in [0, 1) or a count >= 0"
            )
        for name in ("min_chars", "max_documents", "token_budget", "num_proc"):
            _at_least(self, name, 0)


# ----------------------------------------------------------------------------------------------------------
# Sources and held-out sets, and their names


def data_sources(d: DataConfig) -> list[SourceConfig]:
    """The corpora to read: `data.sources`, or the single `data.path` as one source of weight 1."""
    if d.sources:
        return [dataclasses.replace(s, text_column=s.text_column or d.text_column) for s in d.sources]
    return [SourceConfig(path=d.path, weight=1.0, text_column=d.text_column, name=d.name, split=d.split,
                         label=d.label)]


def source_name(source: SourceConfig) -> str:
    """A source's name in metrics, logs and the card: its `label`, else its `name`, else its file's or dataset's
    name made an identifier (`abstracts.txt` -> `abstracts`, `IVN-RIN/BioBERT_Italian` -> `BioBERT_Italian`)."""
    if source.label is not None:
        return source.label
    path = source.path if isinstance(source.path, str) else source.path[0]
    if source.name is not None:
        stem = source.name
    elif path in SHIPPED_CORPORA:
        stem = path.split(":", 1)[1]
    else:
        parts = [p for p in re.split(r"[/\\]", path) if p and not any(ch in p for ch in "*?[")]
        stem = parts[-1] if parts else "corpus"
        if looks_local(path) and "." in stem:
            stem = stem.split(".", 1)[0] or stem
    name = re.sub(r"\W+", "_", stem, flags=re.ASCII).strip("_") or "corpus"
    return f"set_{name}" if name[0].isdigit() else name


def source_names(d: DataConfig) -> list[str]:
    """Each source's name (see `source_name`), in order: distinct identifiers, else one ConfigError."""
    where: dict[str, str] = {}
    for i, source in enumerate(data_sources(d) if d.path is not None or d.sources else []):
        key = (f"data.sources[{i}]" if d.sources else "data") + ".label"
        _add_name(where, source_name(source), key, "source")
    return list(where)


def validation_paths(d: DataConfig) -> dict[str, str | list[str]]:
    """`data.validation_path` by config key: one entry, or one per named held-out set."""
    if isinstance(d.validation_path, dict):
        return {f"data.validation_path.{name}": paths for name, paths in d.validation_path.items()}
    return {} if d.validation_path is None else {"data.validation_path": d.validation_path}


def split_sources(d: DataConfig) -> list[SourceConfig]:
    """The sources whose held-out documents (`data.validation_split`) are a held-out set: every source, unless
    the split is 0 or a plain `data.validation_path` replaces it (a mapping of named sets adds to it)."""
    if not d.validation_split or isinstance(d.validation_path, (str, list)) or (d.path is None and not d.sources):
        return []
    return data_sources(d)


def held_out_set_names(d: DataConfig) -> list[str]:
    """The names of the held-out sets, in order: each source's split, then each named `data.validation_path`.

    Each is an identifier (it becomes part of metric names: `eval_<name>_loss`) and no two are alike.
    """
    where: dict[str, str] = {}
    sources = split_sources(d)
    for i, source in enumerate(sources):
        key = (f"data.sources[{i}]" if d.sources else "data") + ".label"
        _add_name(where, source_name(source), key, "held-out set")
    if isinstance(d.validation_path, dict):
        if not d.validation_path:
            raise ConfigError("data.validation_path: {} names no held-out set; map names to files, "
                              "e.g. {general: general.txt}")
        for name in d.validation_path:
            _add_name(where, name, f"data.validation_path.{name}", "held-out set")
    elif d.validation_path is not None:
        where["validation"] = "data.validation_path"
    return list(where)


def _add_name(where: dict[str, str], name: str, key: str, what: str) -> None:
    """Record `name` (from config `key`) in `where`, refusing one that is no identifier or is already taken."""
    if not (isinstance(name, str) and name.isidentifier() and name.isascii()):
        raise ConfigError(f"{key}: {show(name)} is not allowed as the name of a {what}; use letters, digits and _ "
                          "(not first a digit), e.g. general or biomed_it")
    if name in where:
        raise ConfigError(f"{key}: two {what}s are named {name!r} ({where[name]} and {key}); give each a "
                          "distinct name (data.label, data.sources[].label)")
    where[name] = key
