"""Reading a config: a YAML file (safe loader, no key written twice, no alias bomb) or a dict, dotted
`key=value` overrides on top, then every section built and checked into an `IgeaConfig`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from igea.config.checks import IgeaConfig
from igea.config.coerce import build_section
from igea.errors import ConfigError


def load_config(source: str | os.PathLike | dict[str, Any], overrides: list[str] | str | None = None) -> IgeaConfig:
    """A validated config from a YAML file or a dict (the same sections), with dotted `key=value` overrides.

    >>> cfg = load_config("configs/demo.yaml", ["training.learning_rate=1e-4"])
    >>> cfg = load_config({"model": {"tiny": {}}, "data": {"path": "igea:sample"}}, "training.max_steps=5")

    `training.output_dir` defaults to `runs/<file name>` (`runs/igea` for a dict). Relative paths in a config
    are relative to the current directory, as on the command line.
    """
    if isinstance(source, dict):
        raw, name = copy.deepcopy(source), "igea"
    else:
        raw, name = read_yaml(Path(source)), Path(source).stem
    for item in [overrides] if isinstance(overrides, str) else overrides or []:
        apply_override(raw, item)
    raw.setdefault("training", {})
    if isinstance(raw["training"], dict):
        raw["training"].setdefault("output_dir", str(Path("runs") / name))
    return config_from_dict(raw)


class ConfigLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, except that a key written twice in one mapping is an error: PyYAML would keep
    the last one silently (two held-out sets with one name, a setting given twice). Keys that `<<:` merges in may
    be overridden as usual."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} appears twice in one mapping (lines {seen[key]} and "
                            f"{key_node.start_mark.line + 1})", problem_mark=key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML text as Python values, by `ConfigLoader` (safe, no key twice)."""
    return yaml.load(text, Loader=ConfigLoader)


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping of sections (`yaml.safe_load`), every problem one ConfigError."""
    if path.is_dir():
        raise ConfigError(f"config: '{path}' is a directory; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"config: file '{path}' does not exist")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config: '{path}' is not valid YAML{line}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: '{path}' is not UTF-8 text") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: '{path}' must be a mapping of sections, got a {type(raw).__name__}")
    if expanded_size(raw) > MAX_CONFIG_VALUES:
        raise ConfigError(f"config: '{path}' expands to more than {MAX_CONFIG_VALUES:,} values (nested YAML aliases)")
    return raw


MAX_CONFIG_VALUES = 100_000
"""More values than any real config has; a few lines of nested YAML aliases can expand to billions."""


def expanded_size(node: Any, memo: dict[int, int] | None = None) -> int:
    """How many values `node` holds once YAML aliases are expanded (shared sub-trees counted once each use)."""
    memo = {} if memo is None else memo
    if not isinstance(node, (dict, list)):
        return 1
    if id(node) not in memo:
        memo[id(node)] = 0  # a self-referencing alias counts as one value
        children = node.values() if isinstance(node, dict) else node
        memo[id(node)] = 1 + sum(expanded_size(child, memo) for child in children)
    return memo[id(node)]


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`1e-4` becomes a number later)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}': expected KEY=VALUE with a dotted key, e.g. training.learning_rate=1e-4")
    parts = key.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"override '{item}': the key must name a section and a field, e.g. data.block_size=512")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = parse_yaml(value) if value.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        hint = "" if isinstance(err, yaml.constructor.ConstructorError) else "; quote text"
        raise ConfigError(f"override '{item}': the value is not valid YAML ({problem}){hint}") from None


def config_from_dict(raw: dict[str, Any]) -> IgeaConfig:
    """Build and validate an `IgeaConfig` from a plain dict (a parsed YAML file)."""
    return build_section(IgeaConfig, raw, "")
