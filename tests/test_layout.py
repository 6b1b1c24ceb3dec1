"""The house: imports run one way, config at the bottom and cli at the top; argparse lives in cli.py only."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import igea
import igea.config

PACKAGE = Path(igea.__file__).parent
ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    {"errors", "hub", "metrics", "logs", "progress"},
    {"config"},
    {"rundir", "blockstore", "preemption"},
    {"streaming", "runstart", "status"},
    {"data"},
    {"modeling", "newrows"},
    {"vocab", "tasks", "tracking"},
    {"basemodel"},
    {"lora", "preflight", "arguments"},
    {"trainer"},
    {"train"},
    {"evaluate", "generate"},
    {"report"},
    {"run", "merge"},
    {"cli", "__main__", "__init__"},
]
"""Each module may import modules of its own layer or of the layers before it, never one after it."""

CONFIG_LAYERS = [
    {"coerce", "files"},
    {"schema"},
    {"sources"},
    {"checks"},
    {"loading"},
    {"__init__"},
]
"""Inside igea/config/, one module per job: each imports only modules of the layers before its own (the package's
face, `__init__`, re-exports them all), so that none imports one that imports it."""


def igea_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {name.split(".")[1] for name in names if name.startswith("igea.")}


def config_imports(path: Path) -> set[str]:
    """The modules of igea/config/ that a file imports (`__init__` for `igea.config` itself)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {(name.split(".") + ["__init__"])[2] for name in names if name.split(".")[:2] == ["igea", "config"]}


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def test_every_module_is_placed_in_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py")} | packages
    placed = set().union(*LAYERS)
    assert modules == placed, (modules - placed, placed - modules)


def test_imports_run_one_way():
    for path in [*PACKAGE.glob("*.py"), *PACKAGE.glob("tasks/*.py"), *PACKAGE.glob("config/*.py")]:
        module = path.stem if path.parent == PACKAGE else path.parent.name
        for imported in igea_imports(path) - {module}:
            assert layer_of(imported) <= layer_of(module), f"igea.{module} imports igea.{imported}, a layer above it"


def test_config_modules_are_placed_and_import_one_way():
    modules, placed = {p.stem for p in (PACKAGE / "config").glob("*.py")}, set().union(*CONFIG_LAYERS)
    assert modules == placed, (modules - placed, placed - modules)
    layer = {module: i for i, names in enumerate(CONFIG_LAYERS) for module in names}
    for path in (PACKAGE / "config").glob("*.py"):
        for imported in config_imports(path):
            assert layer[imported] < layer[path.stem], f"igea.config.{path.stem} imports igea.config.{imported}"
        outside = igea_imports(path) - {"config"}
        assert all(layer_of(m) < layer_of("config") for m in outside), (path.name, outside)


def names_taken_from_config() -> dict[str, str]:
    """Every name that igea's other modules, the tests, the benchmarks, the examples and the README take from
    `igea.config` (`from igea.config import NAME` or `igea.config.NAME`), with a file that takes it."""
    taken: dict[str, str] = {}
    files = [p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE / "config"]
    files += [p for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name]
    files += [*(ROOT / "bench").glob("*.py"), ROOT / "README.md"]
    for path in files + sorted((ROOT / "examples").glob("*.ipynb")):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".ipynb":
            text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "code")
        if path.suffix in (".py", ".ipynb"):
            tree = ast.parse(re.sub(r"(?m)^\s*[!%].*$", "", text))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "igea.config":
                    taken.update({alias.name: path.name for alias in node.names})
        taken.update({name: path.name for name in re.findall(r"\bigea\.config\.(\w+)", text)})
    return taken


def test_every_name_taken_from_config_is_there():
    taken = names_taken_from_config()
    assert {"IgeaConfig", "load_config", "config_from_dict", "DataConfig", "build_section"} <= set(taken)
    modules = {p.stem for p in (PACKAGE / "config").glob("*.py")}
    missing = {name: where for name, where in taken.items() if name not in modules and not hasattr(igea.config, name)}
    assert not missing, missing
    assert set(taken) - modules <= set(igea.config.__all__), set(taken) - modules - set(igea.config.__all__)
    for name in ("IgeaConfig", "load_config", "preset"):  # the public API: igea.load_config, ...
        assert getattr(igea, name) is getattr(igea.config, name)


def test_argparse_only_in_the_cli():
    users = [p.name for p in PACKAGE.rglob("*.py") if "import argparse" in p.read_text(encoding="utf-8")]
    assert users == ["cli.py"], users
