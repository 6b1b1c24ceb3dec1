"""Every code block of the README runs as written, in order, offline, against a shortened demo config.

`bash` blocks run in bash and `python` blocks in this interpreter, all in one working directory (so a block
can use the run an earlier one made) that holds the shipped configs, with `configs/demo.yaml` cut to a few
steps. `yaml` blocks must be valid config sections. A block can be skipped only with a reason, given in an
HTML comment right above it: `<!-- readme-test: skip: why -->`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from igea.config import config_from_dict

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^\n]*?) -->\n)?```(?P<lang>[a-z]+)\n(?P<body>.*?)\n```", re.S)
SHORT_DEMO = {"max_steps": 16, "eval_steps": 8, "save_steps": 8, "logging_steps": 4}


def readme_blocks() -> list[tuple[str, str, str]]:
    """(language, body, mark) of each fenced block, in order; heredocs inside bash blocks stay inside."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks, position = [], 0
    while match := BLOCK.search(text, position):
        blocks.append((match["lang"], match["body"], match["mark"] or ""))
        position = match.end()
    return blocks


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory like a fresh clone's: the shipped configs, `configs/demo.yaml` shortened."""
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "configs", work / "configs")
    demo = work / "configs" / "demo.yaml"
    raw = yaml.safe_load(demo.read_text(encoding="utf-8"))
    raw["training"].update(SHORT_DEMO)
    demo.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return work


def run_block(lang: str, body: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = ["bash", "-euo", "pipefail", "-c", body] if lang == "bash" else [sys.executable, "-c", body]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_the_readme_has_runnable_blocks_and_every_skip_says_why():
    langs = [lang for lang, _, _ in BLOCKS]
    assert langs.count("bash") >= 5 and langs.count("python") >= 1
    for lang, body, mark in BLOCKS:
        assert lang in ("bash", "python", "yaml", "text"), (lang, body[:60])
        if mark:
            assert mark.startswith("skip: ") and len(mark) > len("skip: ") + 10, mark


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{i}-{lang}" for i, (lang, _, _) in enumerate(BLOCKS)])
def test_readme_block_runs(index, workdir):
    lang, body, mark = BLOCKS[index]
    if lang == "text":
        return
    if mark.startswith("skip: "):
        if "make demo" in body:  # the set-up block: run what `make demo` runs, the rest is CI's own command
            dry_run = subprocess.run(["make", "-n", "--no-print-directory", "demo"], cwd=ROOT, capture_output=True,
                                     text=True, check=True).stdout
            recipe = [line for line in dry_run.splitlines() if "igea train" in line][-1]
            assert recipe.startswith(".venv/bin/igea train configs/demo.yaml"), recipe
            done = run_block("bash", recipe.removeprefix(".venv/bin/"), workdir)
            assert done.returncode == 0, done.stderr[-3000:]
            assert "run saved in runs/demo" in done.stdout
        return
    if lang == "yaml":
        check_config_block(body, workdir)
        return
    done = run_block(lang, body, workdir)
    assert done.returncode == 0, f"README block {index} failed:\n{body}\n--- stderr:\n{done.stderr[-3000:]}"


def check_config_block(body: str, workdir: Path) -> None:
    """A YAML block is a valid part of a config: merged into the demo config, the whole loads."""
    block = yaml.safe_load(body)
    raw = yaml.safe_load((workdir / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    for section, values in block.items():
        raw[section] = {**(raw.get(section) or {}), **(values or {})}
    if "name_or_path" in block.get("model", {}):
        raw["model"].pop("tiny", None)
    config_from_dict(raw)
