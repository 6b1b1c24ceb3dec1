"""The command's logs: the libraries' Python warnings are log lines, once each, named after their module."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import igea
from igea.logs import module_name, route_warnings

from conftest import config_dict, raw_warning_lines

ROOT = Path(__file__).resolve().parents[1]

LIBRARY = '''
import warnings

def deprecated():
    warnings.warn("`old_api` is deprecated, use `new_api`", FutureWarning)

def careful():
    warnings.warn("this may go\\n  wrong", UserWarning)
'''


@pytest.fixture
def library(tmp_path, monkeypatch):
    """A package on sys.path whose functions warn, as a library's do."""
    (tmp_path / "somelib").mkdir()
    (tmp_path / "somelib" / "__init__.py").write_text("")
    (tmp_path / "somelib" / "core.py").write_text(LIBRARY)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("somelib", "somelib.core"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import somelib.core

    return somelib.core


def test_a_warning_is_one_log_line_named_after_its_module_and_not_repeated(library, caplog):
    caplog.set_level(logging.INFO)
    warnings.simplefilter("default")  # Python's own filters, not the test suite's
    route_warnings(main_process=True)
    library.deprecated()
    library.careful()
    library.deprecated()
    warnings.warn("`old_api` is deprecated, use `new_api`", FutureWarning, stacklevel=1)  # same text, elsewhere
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("somelib.core", logging.WARNING, "`old_api` is deprecated, use `new_api`"),
        ("somelib.core", logging.WARNING, "this may go wrong"),
    ]
    assert raw_warning_lines(caplog.text) == []


def test_handled_warnings_are_dropped_and_other_ranks_log_at_debug(library, caplog):
    caplog.set_level(logging.DEBUG)
    warnings.simplefilter("default")
    route_warnings(main_process=False)
    warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
    library.careful()
    assert [(r.name, r.levelno) for r in caplog.records] == [("somelib.core", logging.DEBUG)]


def test_module_names_come_from_the_import_path():
    import transformers.modeling_utils

    assert module_name(transformers.modeling_utils.__file__) == "transformers.modeling_utils"
    assert module_name(igea.__file__) == "igea"
    assert module_name("<frozen importlib._bootstrap>") == "<frozen importlib._bootstrap>"


def test_only_the_command_configures_logging_and_warnings():
    """igea used from Python (`igea.run`, `igea.train`) leaves the application's logging and warnings alone."""
    package = Path(igea.__file__).parent
    callers = sorted(p.name for p in package.rglob("*.py")
                     if any(call in p.read_text(encoding="utf-8")
                            for call in ("basicConfig(", "route_warnings(", "captureWarnings(", "showwarning =")))
    assert callers == ["cli.py", "logs.py"], callers


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with tied input and output embeddings, as most small real models have."""
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    out = tmp_path_factory.mktemp("tied") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.slow
def test_a_lora_run_training_the_tied_embeddings_prints_no_raw_warnings(tied_model_dir, corpus_file, tmp_path):
    """peft warns about the tied embeddings it trains, and reads a property transformers deprecated: the
    command prints log lines, never `UserWarning:` / `FutureWarning:` with a line of library source."""
    raw = config_dict(tmp_path / "lora", tied_model_dir, corpus_file, data={"validation_split": 8},
                      training={"max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1})
    raw["peft"] = {"r": 4, "modules_to_save": ["embed_tokens", "lm_head"]}
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "igea", "train", str(config)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert raw_warning_lines(done.stdout + done.stderr) == []
    assert "is_gradient_checkpointing" not in done.stderr  # handled: nothing for the user to do
    tied = [line.split(" ", 2)[1] for line in done.stderr.splitlines() if "tied" in line]
    # igea keeps the pair tied and says so, and saves the shared matrix once; peft has nothing left to warn about
    assert tied == ["igea.lora:", "igea.lora:"]
