"""The bad-input catalogue: each case is one line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from igea.cli import main
from igea.hub import hub_reachable


def config_text(model: str, corpus: str, out: Path, data: str = "", training: str = "") -> str:
    return (
        f"model:\n  name_or_path: {model}\n"
        f"data:\n  path: {corpus}\n  block_size: 64\n  validation_split: 0.1\n{data}"
        f"training:\n  output_dir: {out}\n  max_steps: 2\n  use_cpu: true\n  disable_tqdm: true\n{training}"
        "generation:\n  prompts: []\n"
    )


def no_eos_model(tmp: Path, model_dir: Path) -> str:
    target = tmp / "no-eos"
    shutil.copytree(model_dir, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(target)
    return str(target)


def remote_code_model(tmp: Path) -> str:
    target = tmp / "remote"
    target.mkdir()
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (target / "config.json").write_text(json.dumps({"model_type": "igea_custom", "auto_map": auto_map}))
    (target / "tokenizer_config.json").write_text("{}")  # a model directory without a tokenizer fails before
    for name in ("configuration_x.py", "modeling_x.py"):
        (target / name).write_text("raise SystemExit('remote code ran')\n")
    return str(target)


def write(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    return str(path)


NON_TEXT = '{"text": "Il fegato è una ghiandola."}\n{"text": 42}\n'
MALFORMED = '{"text": "Il fegato è una ghiandola."}\n{"text": "interrotto\n'
LATIN1 = '{"text": "Il fegato è una ghiandola."}\n'.encode() + '{"text": "fegato è"}\n'.encode("latin-1")
STREAMED = {"data": "  streaming: true\n", "overrides": ["data.validation_split=1"]}


def dangling_link(tmp: Path) -> str:
    link = tmp / "corpus.txt"
    link.symlink_to(tmp / "moved-away.txt")
    return str(link)


# Each case: (builds the argv from tmp dir, model dir, corpus file) -> expected fragment of the error line.
Case = Callable[[Path, Path, Path], list[str]]


def train_case(**kw) -> Case:
    def build(tmp: Path, model: Path, corpus: Path) -> list[str]:
        model_path = kw.get("model", lambda t, m: str(m))(tmp, model)
        corpus_path = kw.get("corpus", lambda t, c: str(c))(tmp, corpus)
        text = kw.get("text") or config_text(model_path, corpus_path, tmp / "run", kw.get("data", ""),
                                              kw.get("training", ""))
        cfg = write(tmp, "c.yaml", text)
        setup = kw.get("setup")
        if setup:
            setup(tmp)
        return ["train", cfg, *kw.get("overrides", [])]
    return build


def finished_run(tmp: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "igea_run.json").write_text("{}")


def unfinished_run(tmp: Path) -> None:
    (tmp / "run" / "checkpoint-5").mkdir(parents=True)
    (tmp / "run" / "igea_start.json").write_text("{}")
    (tmp / "run" / "checkpoint-5" / "igea_checkpoint.json").write_text('{"global_step": 5}')


def project_folder(tmp: Path) -> None:
    """A user's folder, not an igea run: never written into, never deleted."""
    (tmp / "run" / "notes").mkdir(parents=True)
    for name, text in [("thesis.tex", "x"), ("README.md", "mine"), ("config.json", "{}"), ("notes/a.txt", "a")]:
        (tmp / "run" / name).write_text(text)


def runs_folder(tmp: Path) -> None:
    """A folder holding two finished runs: as an output_dir it is not a run itself."""
    for name in ("expA", "expB"):
        (tmp / "run" / name).mkdir(parents=True)
        (tmp / "run" / name / "igea_run.json").write_text("{}")
        (tmp / "run" / name / "model.safetensors").write_text("weights")


def run_with_a_foreign_file(tmp: Path) -> None:
    finished_run(tmp)
    (tmp / "run" / "model.safetensors").write_text("weights")
    (tmp / "run" / "thesis.tex").write_text("not igea's")


def run_in_use(tmp: Path) -> None:
    """An unfinished run whose lock is held by a live process on this host (this one)."""
    (tmp / "run").mkdir()
    (tmp / "run" / "igea_start.json").write_text("{}")
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-11-28 07:00:00"}
    (tmp / "run" / "igea.lock").write_text(json.dumps(lock))


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)
) + "model: *i\n"


def unreadable_task(tmp: Path) -> str:
    return write(tmp, "quiz.jsonl", '{"question": "Il fegato è", "choices": ["un organo"\n')


CASES: dict[str, tuple[Case, str]] = {
    "malformed yaml": (train_case(text="model: [unclosed\n"), "is not valid YAML at line"),
    "config is a list": (train_case(text="- model\n- data\n"), "must be a mapping of sections, got a list"),
    "unknown key": (train_case(training="  learnig_rate: 1.0\n"), "did you mean 'learning_rate'"),
    "wrong type": (train_case(training="  per_device_train_batch_size: eight\n"),
                   "per_device_train_batch_size: expected an integer, got 'eight'"),
    "negative learning rate": (train_case(training="  learning_rate: -1.0e-4\n"),
                               "training.learning_rate: -0.0001 is not allowed"),
    "zero learning rate": (train_case(training="  learning_rate: 0\n"), "training.learning_rate: 0.0 is not allowed"),
    "warmup ratio out of range": (train_case(training="  warmup_ratio: 2\n"), "warmup_ratio: 2.0 is not allowed"),
    "override naming no key": (train_case(overrides=["training.not_a_field=3"]), "unknown key 'training.not_a_field'"),
    "override without value": (train_case(overrides=["training.learning_rate"]), "expected KEY=VALUE"),
    "block size above context": (train_case(overrides=["data.block_size=4096"]),
                                 "data.block_size: 4096 is longer than the model's context (512"),
    "total batch not divisible": (train_case(training="  total_train_batch_size: 10\n"),
                                  "total_train_batch_size: 10 is not divisible by"),
    "missing corpus file": (train_case(corpus=lambda t, c: str(t / "missing.txt")), "no file matches"),
    "directory without corpus files": (train_case(corpus=lambda t, c: str(t)), "holds no .txt, .jsonl"),
    "unsupported corpus format": (train_case(corpus=lambda t, c: write(t, "notes.docx", "x")),
                                  "is not a .txt, .jsonl, .json, .parquet or .csv file"),
    "empty corpus": (train_case(corpus=lambda t, c: write(t, "empty.txt", "\n \n\n")), "has no documents"),
    "non-UTF-8 corpus": (train_case(corpus=lambda t, c: write(t, "latin1.txt", "fegato è\n".encode("latin-1"))),
                         "is not valid UTF-8"),
    "missing text column": (train_case(corpus=lambda t, c: write(t, "c.jsonl", '{"body": "testo"}\n')),
                            "column 'text' is not in"),
    "validation takes every document": (train_case(overrides=["data.validation_split=593"]),
                                        "leaves no training documents"),
    "unreachable hub model": (train_case(model=lambda t, m: "no-org/no-such-model"),
                              "cannot load model 'no-org/no-such-model'"),
    "unreachable hub dataset": (train_case(corpus=lambda t, c: "no-org/no-such-corpus"),
                                "cannot load dataset 'no-org/no-such-corpus'"),
    "tokenizer without eos": (train_case(model=no_eos_model), "has no EOS token"),
    "model needs remote code": (train_case(model=lambda t, m: remote_code_model(t)),
                                "needs custom code from its repository; set model.trust_remote_code"),
    "finished run in output dir": (train_case(setup=finished_run), "holds a finished run; use --overwrite"),
    "unfinished run without --resume": (train_case(setup=unfinished_run), "use --resume"),
    "unknown task name": (lambda tmp, m, c: ["eval", str(m), "--tasks", "medmcqa_itaa"],
                          "unknown task 'medmcqa_itaa'; known tasks: "),
    "task answer out of range": (lambda tmp, m, c: ["eval", str(m), "--tasks", write(
        tmp, "mc.jsonl", '{"question": "Il fegato è", "choices": ["un organo", "un osso"], "answer": 5}\n')],
        "answer 5 is out of range: there are 2 choices"),
    "config is a directory": (lambda tmp, m, c: ["train", str(tmp)], "is a directory; give the path of a YAML file"),
    # output directories igea must not write into or replace
    "output dir is a project folder": (train_case(setup=project_folder), "is not empty and holds no igea run"),
    "overwrite a project folder": (train_case(setup=project_folder, overrides=["--overwrite"]),
                                   "is not empty and holds no igea run"),
    "overwrite a folder of runs": (train_case(setup=runs_folder, overrides=["--overwrite"]),
                                   "holds no igea run ('expA', 'expB')"),
    "overwrite a run holding a foreign file": (train_case(setup=run_with_a_foreign_file, overrides=["--overwrite"]),
                                               "holds files igea did not write ('thesis.tex')"),
    "output dir used by a live run": (train_case(setup=run_in_use, overrides=["--overwrite"]),
                                      f"is in use by another igea run (process {os.getpid()} on host"),
    "allow config change without resume": (train_case(overrides=["--allow-config-change"]),
                                            "--allow-config-change goes with --resume"),
    "jit checkpoint": (train_case(training="  enable_jit_checkpoint: true\n"), "igea itself saves a checkpoint"),
    # settings that could only fail at the end of training are refused before it
    "max_new_tokens beyond the context": (train_case(overrides=["generation.prompts=[Il fegato è]",
                                                                "generation.max_new_tokens=1000000000000"]),
                                          "do not fit the model's context of 512 positions"),
    "temperature is NaN": (train_case(overrides=["generation.temperature=.nan"]),
                           "generation.temperature: nan is not allowed; it must be a finite number"),
    "empty prompt": (train_case(overrides=["generation.prompts=['']"]), "generation.prompts[0]: an empty prompt"),
    "unreadable eval task file": (lambda tmp, m, c: train_case(overrides=[f"eval.tasks=[{unreadable_task(tmp)}]"])(
        tmp, m, c), "quiz.jsonl"),
    # values that used to end in a traceback
    "override is not valid YAML": (train_case(overrides=["training.learning_rate=[1e-4"]),
                                   "override 'training.learning_rate=[1e-4': the value is not valid YAML"),
    "learning rate is NaN": (train_case(training="  learning_rate: .nan\n"), "must be a finite number"),
    "epochs are infinite": (train_case(training="  num_train_epochs: .inf\n"),
                            "training.num_train_epochs: inf is not allowed; it must be a finite number"),
    "max_grad_norm is NaN": (train_case(training="  max_grad_norm: .nan\n"),
                             "training.max_grad_norm: nan is not allowed"),
    "alias bomb": (train_case(text=ALIAS_BOMB), "expands to more than 100,000 values"),
    "typo in a source's file name": (train_case(text=None, data="", corpus=lambda t, c: str(c)[:-1]),
                                     "no file matches"),
    "typo in a mixture source": (lambda tmp, m, c: train_case(text=config_text(str(m), str(c), tmp / "run").replace(
        f"  path: {c}\n", f"  sources:\n    - {{path: {str(c)[:-1]}, weight: 1}}\n"))(tmp, m, c),
        "data.sources[0].path: no file matches"),
    "relative path that matches nothing": (train_case(corpus=lambda t, c: "corpus.tx"),
                                           "no file matches 'corpus.tx' (relative to the current directory"),
    "eval output in a missing directory": (lambda tmp, m, c: ["eval", str(m), "--corpus", str(c), "--output",
                                                              str(tmp / "missing" / "r.json")],
                                           "--output: directory"),
    "config file missing": (lambda tmp, m, c: ["train", str(tmp / "nope.yaml")], "does not exist"),
    "non-text value in a jsonl corpus": (train_case(corpus=lambda t, c: write(t, "n.jsonl", NON_TEXT)),
                                         "n.jsonl' row 2: column 'text' holds 42 (int), not text"),
    "non-text value in an eval corpus": (lambda t, m, c: ["eval", str(m), "--corpus", write(t, "n.jsonl", NON_TEXT)],
                                         "n.jsonl' row 2: column 'text' holds 42 (int), not text"),
    "non-text value in a streamed corpus": (train_case(corpus=lambda t, c: write(t, "n.jsonl", NON_TEXT), **STREAMED),
                                            "n.jsonl' row 2: column 'text' holds 42 (int), not text"),
    "malformed jsonl corpus": (train_case(corpus=lambda t, c: write(t, "m.jsonl", MALFORMED)),
                               "m.jsonl' line 2 is not valid JSON"),
    "malformed jsonl corpus, streamed": (train_case(corpus=lambda t, c: write(t, "m.jsonl", MALFORMED), **STREAMED),
                                         "m.jsonl' line 2 is not valid JSON"),
    "non-UTF-8 jsonl corpus, streamed": (train_case(corpus=lambda t, c: write(t, "l.jsonl", LATIN1), **STREAMED),
                                         "l.jsonl' is not valid UTF-8 (line 2)"),
    "dangling symlink as corpus": (train_case(corpus=lambda t, c: dangling_link(t)),
                                   "corpus.txt' is a symbolic link to"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path, tiny_model_dir, corpus_file, capsys,
                                                          monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub_reachable.cache_clear()
    build, expected = CASES[name]
    argv = build(tmp_path, tiny_model_dir, corpus_file)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # earlier lines can only be progress bars
    assert last.startswith("igea: error: ") and expected in last, err
    assert err.count("igea: error") == 1 and "Traceback" not in err, err
    assert len(last) <= len("igea: error: ") + 1000
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_trust_remote_code_is_off_by_default_and_no_remote_code_runs(tmp_path, corpus_file, capsys):
    model = remote_code_model(tmp_path)
    cfg = write(tmp_path, "c.yaml", config_text(model, str(corpus_file), tmp_path / "run"))
    assert main(["train", cfg]) == 2  # the remote module would SystemExit with another message
    assert "remote code ran" not in capsys.readouterr().err
