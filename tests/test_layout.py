"""The house: imports run one way, config at the bottom and cli at the top; argparse lives in cli.py only."""

from __future__ import annotations

import ast
from pathlib import Path

import igea

PACKAGE = Path(igea.__file__).parent

LAYERS = [
    {"errors", "hub", "metrics", "logs", "progress"},
    {"config"},
    {"rundir", "blockstore", "preemption"},
    {"streaming", "runstart"},
    {"data"},
    {"modeling", "newrows"},
    {"vocab", "tasks", "tracking"},
    {"basemodel"},
    {"lora", "preflight", "arguments"},
    {"trainer"},
    {"train"},
    {"evaluate", "generate"},
    {"report"},
    {"run"},
    {"cli", "__main__", "__init__"},
]
"""Each module may import modules of its own layer or of the layers before it, never one after it."""


def igea_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {name.split(".")[1] for name in names if name.startswith("igea.")}


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def test_every_module_is_placed_in_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py")} | packages
    placed = set().union(*LAYERS)
    assert modules == placed, (modules - placed, placed - modules)


def test_imports_run_one_way():
    for path in [*PACKAGE.glob("*.py"), *PACKAGE.glob("tasks/*.py")]:
        module = path.stem if path.parent == PACKAGE else path.parent.name
        for imported in igea_imports(path) - {module}:
            assert layer_of(imported) <= layer_of(module), f"igea.{module} imports igea.{imported}, a layer above it"


def test_argparse_only_in_the_cli():
    users = [p.name for p in PACKAGE.rglob("*.py") if "import argparse" in p.read_text(encoding="utf-8")]
    assert users == ["cli.py"], users
