"""Multiple-choice tasks: prompts, answers, scoring, errors, and equality with lm-evaluation-harness."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from igea.config import BUILTIN_TASK_NAMES, EvalConfig
from igea.errors import ConfigError, IgeaError
from igea.tasks import (
    BUILTIN_TASKS,
    Item,
    LocalTaskSpec,
    MultipleChoiceTask,
    check_task_names,
    load_local_task,
    load_task,
    load_tasks,
    loglikelihoods,
    markdown_table,
    predictions,
    run_tasks,
)
from igea.tasks.base import sample_examples, with_examples

from conftest import real_abstracts

REPO = Path(__file__).resolve().parents[1]


def cloze_rows(count: int, offset: int = 0) -> list[dict]:
    """Questions made of real abstracts: the first words of one, continued by its next words or another's."""
    texts = [t.split() for t in real_abstracts("dev")]
    rows = []
    for i in range(offset, offset + count):
        words = [texts[(i + k) % len(texts)] for k in range(4)]
        endings = [" ".join(w[10 : 14 + k]) for k, w in enumerate(words)]  # other lengths: acc_norm matters
        gold = i % 4
        endings.insert(gold, endings.pop(0))
        rows.append({"question": " ".join(words[0][:10]), "choices": endings, "answer": gold})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


# ----------------------------------------------------------------------------------------------------------
# Prompts, answers and metrics, by hand


def test_fewshot_examples_skip_the_question_itself_when_shots_come_from_its_split():
    a, b, c = (Item(f"Q{i}\nAnswer:", ("x", "yy"), i % 2) for i in range(3))
    task = MultipleChoiceTask("t", items=with_examples([a, b], [a, b, c], shots_from_items=True, n=2))
    assert task.requests() == [
        ("Q1\nAnswer: yy\n\nQ2\nAnswer: x\n\nQ0\nAnswer:", [" x", " yy"]),
        ("Q0\nAnswer: x\n\nQ2\nAnswer: x\n\nQ1\nAnswer:", [" x", " yy"]),
    ]
    separate = with_examples([a], [a, b], shots_from_items=False, n=1)
    assert separate[0].context == "Q0\nAnswer: x\n\nQ0\nAnswer:"


def test_random_examples_are_lm_evals_default_sampler():
    """A seeded draw of n + 1 without the question itself; copies of it drawn are replaced by a redraw."""
    import random

    pool = list(range(6))
    rnd, mirror = random.Random(1234), random.Random(1234)
    for question in pool:
        drawn = sample_examples(pool, 2, question, rnd)
        assert drawn == [x for x in mirror.sample(pool, 3) if x != question][:2]
    copies = [0, 0, 0, 1, 2]  # seed 7 draws two copies of the question 0: a redraw from the pool without it
    mirror = random.Random(7)
    assert mirror.sample(copies, 3).count(0) == 2
    assert sample_examples(copies, 2, 0, random.Random(7)) == mirror.sample([1, 2], 2)


def test_acc_norm_divides_by_the_length_of_the_choice_in_characters():
    task = MultipleChoiceTask("t", items=[Item("q", ("a", "bbbb", "cc"), 1), Item("q", ("a", "bbbb"), 0)])
    rows = predictions(task, [[-2.0, -4.0, -3.0], [-1.0, -4.0]])
    # -2/1, -4/4, -3/2: the longest choice wins once normalized; -1/1 = -4/4: a tie goes to the first
    assert [(r["pred"], r["pred_norm"]) for r in rows] == [(0, 1), (0, 0)]


def test_local_task_styles_and_answer_forms(tmp_path):
    rows = [
        {"q": "Quale organo?", "opa": "fegato", "opb": "rene", "opc": "cuore", "opd": None, "ans": "B"},
        {"q": "Quale farmaco?", "opa": "statina", "opb": "insulina", "opc": "", "opd": None, "ans": 0},
        {"q": "Quale gene?", "opa": "CFTR", "opb": "BRCA1", "opc": "TP53", "opd": "APC", "ans": "TP53"},
        {"q": "Quale esame?", "opa": "TAC", "opb": "RM", "opc": "ECG", "opd": "EEG", "ans": "3"},
    ]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    spec = LocalTaskSpec(path=str(path), question="q", choices=["opa", "opb", "opc", "opd"], answer="ans")
    text = load_local_task(spec)
    assert [i.gold for i in text.items] == [1, 0, 2, 3]
    assert text.items[0] == Item("Question: Quale organo?\nAnswer:", ("fegato", "rene", "cuore"), 1)
    assert text.items[1].choices == ("statina", "insulina")  # trailing empty options are dropped
    spec.style = "letters"
    letters = load_local_task(spec)
    assert letters.items[0] == Item(
        "Question: Quale organo?\nChoices:\nA. fegato\nB. rene\nC. cuore\nAnswer:", ("A", "B", "C"), 1
    )


def test_local_task_prompt_template_over_the_row(tmp_path):
    rows = [{"domanda": "Quale organo filtra il sangue?", "opzioni": ["fegato", "rene"], "giusta": 1,
             "area": "nefrologia"}]
    write_jsonl(tmp_path / "q.jsonl", rows)
    template = "Area: {{area}}\nDomanda: {{domanda}}\nRisposta:"
    spec = write_yaml(tmp_path / "it.yaml", {"path": "q.jsonl", "choices": "opzioni", "answer": "giusta",
                                             "prompt": template})
    task = load_task(str(spec))
    assert task.items == [Item("Area: nefrologia\nDomanda: Quale organo filtra il sangue?\nRisposta:",
                               ("fegato", "rene"), 1)]
    assert task.requests()[0][1] == [" fegato", " rene"]
    letters = {"path": "q.jsonl", "choices": "opzioni", "answer": "giusta", "style": "letters",
               "prompt": "{{domanda}}\n{% for o in opzioni %}{{'AB'[loop.index0]}}) {{o}}\n{% endfor %}Risposta:"}
    task = load_task(str(write_yaml(tmp_path / "lettere.yaml", letters)))
    assert task.items[0] == Item("Quale organo filtra il sangue?\nA) fegato\nB) rene\nRisposta:", ("A", "B"), 1)
    bad = write_yaml(tmp_path / "bad.yaml", {"path": "q.jsonl", "choices": "opzioni", "answer": "giusta",
                                            "prompt": "Domanda: {{question}}"})
    with pytest.raises(IgeaError, match=r"task 'bad': '.*q.jsonl' row 0: prompt: 'question' is undefined"):
        load_task(str(bad))
    builtin = write_yaml(tmp_path / "med.yaml", {"path": "q.jsonl", "style": "medmcqa_ita", "prompt": "x"})
    with pytest.raises(ConfigError, match="prompt is for styles text and letters"):
        load_task(str(builtin))


def test_markdown_table_has_the_cards_layout():
    def result(label, domain, shots, acc_norm):
        return {"label": label, "domain": domain, "num_fewshot": shots, "acc_norm": acc_norm}

    medmcqa, mmlu = ("medmcqa_ita", "MedMCQA-ITA", "Biomed", 0), ("mmlu_it", "MMLU-IT", "General", 5)
    table = markdown_table({
        "Igea 1B": {medmcqa[0]: result(*medmcqa[1:], 0.3071), mmlu[0]: result(*mmlu[1:], 0.25)},
        "Minerva 1B": {medmcqa[0]: result(*medmcqa[1:], 0.2931)},
    })
    assert table.splitlines() == [
        "| Dataset | Domain | Igea 1B | Minerva 1B |",
        "|:---:|:---:|:---:|:---:|",
        "| MedMCQA-ITA (0-shot) | Biomed | **0.307** | 0.293 |",
        "| MMLU-IT (5-shot) | General | **0.250** | - |",
    ]


# ----------------------------------------------------------------------------------------------------------
# Scoring


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens) from one plain forward pass over context + continuation."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer(stripped)["input_ids"]
    whole = tokenizer(stripped + continuation)["input_ids"]
    ids = torch.tensor([context_ids + whole[len(context_ids):]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    scores = logprobs[torch.arange(len(targets)), targets]
    return float(scores[len(context_ids) - 1:].sum())


def test_scores_equal_a_plain_forward_pass_whatever_the_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    requests = [
        ("Il fegato è", [" una ghiandola", " un", " il più grande organo del corpo umano"]),
        ("La fibrosi cistica è causata da mutazioni del gene CFTR. ", ["Nei pazienti", "La"]),
        ("Abbiamo arruolato 120 pazienti con diabete di tipo 2.\nAnswer:", [" A", " B", " C", " D"]),
    ]
    expected = [[reference_loglikelihood(model, tokenizer, c, x) for x in conts] for c, conts in requests]
    for batch_size in (1, 2, 8):
        got = loglikelihoods(model, tokenizer, requests, batch_size=batch_size)
        for row, want in zip(got, expected, strict=True):
            assert row == pytest.approx(want, abs=1e-4)


def test_run_tasks_reports_acc_and_acc_norm_of_the_predictions(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    path = write_jsonl(tmp_path / "cloze.jsonl", cloze_rows(6))
    result = run_tasks(model, tokenizer, [str(path)], EvalConfig(batch_size=4, limit=5))["cloze"]
    rows = result["predictions"]
    assert len(rows) == result["questions"] == 5
    hits = [r["pred"] == r["gold"] for r in rows]
    assert result["acc"] == pytest.approx(sum(hits) / 5)
    assert result["acc_norm"] == pytest.approx(sum(r["pred_norm"] == r["gold"] for r in rows) / 5)
    assert result["acc_stderr"] == pytest.approx(np.std(hits, ddof=1) / math.sqrt(5))
    for row in rows:
        assert row["pred"] == int(np.argmax(row["loglikelihoods"]))


# ----------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown task 'medmcqa'; known tasks: arc_it, hellaswag_it, medm"):
        check_task_names(["medmcqa_ita", "medmcqa"])
    with pytest.raises(ConfigError, match="task file 'nope.jsonl' does not exist"):
        check_task_names(["nope.jsonl"])


def test_bad_local_tasks_are_one_clear_line(tmp_path):
    good = cloze_rows(2)
    cases = [
        ([{"domanda": "x", "choices": ["a", "b"], "answer": 0}], "column 'question' is missing; its columns"),
        ([{**good[0], "answer": 4}], r"row 0: answer 4 is out of range: there are 4 choices"),
        ([{**good[0], "answer": "Z"}], r"answer 'Z' is out of range"),
        ([{**good[0], "answer": "forse"}], r"answer 'forse' is not an index, a letter or one of the choices"),
        ([{**good[0], "choices": ["solo"]}], "needs at least 2 non-empty choices"),
    ]
    for rows, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(IgeaError, match=message) as err:
            load_task(str(path))
        assert "\n" not in str(err.value)
    empty = write_yaml(tmp_path / "empty.yaml", {"path": str(tmp_path / "none.csv")})
    (tmp_path / "none.csv").write_text("question,choices,answer\n", encoding="utf-8")
    with pytest.raises(IgeaError, match="task 'empty': '.*none.csv' has no questions"):
        load_task(str(empty))
    with pytest.raises(IgeaError, match="task 'blank': '.*blank.jsonl' has no questions"):
        load_task(str(write_jsonl(tmp_path / "blank.jsonl", [])))
    two = write_jsonl(tmp_path / "two.jsonl", good)
    with pytest.raises(IgeaError, match="num_fewshot=2 but only 1 examples can be shown"):
        load_task(str(two), num_fewshot=2)
    spec = write_yaml(tmp_path / "spec.yaml", {"path": "two.jsonl", "stile": "text"})
    with pytest.raises(ConfigError, match="file '.*spec.yaml': unknown key 'stile'; did you mean 'style'"):
        load_task(str(spec))
    spec = write_yaml(tmp_path / "spec.yaml", {"path": "two.jsonl", "style": "lettere"})
    with pytest.raises(ConfigError, match="style 'lettere' is not allowed; choose one of text, letters, arc"):
        load_task(str(spec))


def test_builtin_task_offline_is_one_clear_line(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    message = "task 'medmcqa_ita': cannot load 'Detsutut/medmcqa-ita' from the Hugging Face hub .*'style: med"
    with pytest.raises(IgeaError, match=message) as err:
        load_task("medmcqa_ita")
    assert "\n" not in str(err.value)


def test_unreachable_hub_fails_in_seconds_with_one_line(monkeypatch, tmp_path, tiny_model_dir, capsys):
    """Not in offline mode, the hub unreachable: no retries (huggingface_hub's take ~25 s), one line."""
    import time

    import datasets
    from huggingface_hub import constants

    from igea.cli import main
    from igea.hub import hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    hub_reachable.cache_clear()
    try:
        hub_yaml = write_yaml(tmp_path / "hub.yaml", {
            "task": "pubmedqa_it", "dataset_path": "someone/pubmedqa-it", "output_type": "multiple_choice",
            "test_split": "test", "doc_to_text": "question", "doc_to_choice": "choices", "doc_to_target": "answer",
        })
        for task, message in [
            ("medmcqa_ita", "task 'medmcqa_ita': cannot load 'Detsutut/medmcqa-ita' from the Hugging Face hub "
                            "(unreachable; set HF_HUB_OFFLINE=1 to use a cached copy); for a local copy, use a "
                            ".yaml task file with 'style: medmcqa_ita'"),
            (str(hub_yaml), "task 'pubmedqa_it': cannot load 'someone/pubmedqa-it' from the Hugging Face hub "
                            "(unreachable"),
        ]:
            start = time.monotonic()
            assert main(["eval", str(tiny_model_dir), "--tasks", task]) == 2
            assert time.monotonic() - start < 10
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"igea: error: {message}"), err
    finally:
        hub_reachable.cache_clear()


def test_builtin_task_names_are_the_ones_the_config_checks():
    assert sorted(BUILTIN_TASKS) == sorted(BUILTIN_TASK_NAMES)


def test_config_imports_nothing_of_igea_but_errors():
    """Imports run one way: config at the bottom (it checks task names without importing igea.tasks)."""
    import ast

    modules: set[str] = set()
    for path in (REPO / "src" / "igea" / "config").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    outside = {m for m in modules if m.split(".")[0] == "igea" and m.split(".")[:2] != ["igea", "config"]}
    assert outside == {"igea.errors"}


def test_load_tasks_reads_every_task_before_training(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", cloze_rows(3))
    tasks = load_tasks([str(good)], EvalConfig(limit=2, num_fewshot=1))
    assert [(t.name, len(t.items), t.num_fewshot) for t in tasks] == [("good", 2, 1)]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**cloze_rows(1)[0], "answer": 9}])
    with pytest.raises(IgeaError, match="task 'bad': '.*bad.jsonl' row 0: answer 9 is out of range"):
        load_tasks([str(good), str(bad)])
    with pytest.raises(ConfigError, match="eval.tasks: unknown task 'mmlu'"):
        load_tasks([str(good), "mmlu"])


LM_EVAL_BASE = {"task": "t", "dataset_path": "json", "output_type": "multiple_choice", "test_split": "test",
                "doc_to_text": "{{question}}", "doc_to_choice": "choices", "doc_to_target": "answer",
                "dataset_kwargs": {"data_files": {"test": "q.jsonl"}}}
BAD_LM_EVAL_FILES = {  # a change to a good lm-eval task file (keys, or a YAML line) -> the one line saying so
    "python code": ("process_docs: !function utils.process_docs\n",
                    r"process_docs: '!function utils.process_docs' runs Python code, which igea does not"),
    "include": ({"include": "_default_template_yaml"}, "lm-eval key 'include' is not supported: igea reads one"),
    "generation": ({"output_type": "generate_until"}, "output_type is 'generate_until'; igea scores multiple_choice"),
    "default output type": ({"output_type": None}, "output_type is not set .lm-eval's default is generate_until"),
    "typo": ({"doc_to_txt": "question"}, "unknown key 'doc_to_txt'; did you mean 'doc_to_text'"),
    "missing file": ({"dataset_kwargs": {"data_files": {"test": "nope.jsonl"}}},
                     "dataset_kwargs.data_files: 'nope.jsonl' does not exist .relative paths are read from the curr"),
    "no files": ({"dataset_kwargs": None}, "dataset_path 'json' needs dataset_kwargs.data_files"),
    "other dataset kwargs": ({"dataset_kwargs": {"data_files": "q.jsonl", "streaming": True}},
                             r"dataset_kwargs.streaming is not supported; allowed: data_files"),
    "metric": ({"metric_list": [{"metric": "f1"}]}, r"metric_list\[0\].metric: 'f1' is not computed by igea"),
    "sampler": ({"fewshot_config": {"sampler": "balanced"}}, "fewshot_config.sampler: 'balanced' is not allowed"),
    "several answers": ({"doc_to_target": [0, 1]}, "doc_to_target: a list means several right answers"),
    "one context per choice": ({"doc_to_text": 0}, "doc_to_text: 0 means one context per choice"),
    "no split": ({"test_split": None}, "set test_split or validation_split"),
    "group": ({"task": ["a", "b"]}, "task: a list of tasks is a group"),
    "mixed formats": ({"path": "q.jsonl"},
                      r"mixes igea task keys \(path\) with lm-eval task keys \(dataset_kwargs, dataset_path"),
}


@pytest.mark.parametrize("case", list(BAD_LM_EVAL_FILES))
def test_bad_lm_eval_task_files_are_one_line_naming_the_key(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data files are read relative to the current directory, as lm-eval reads them
    write_jsonl(tmp_path / "q.jsonl", cloze_rows(2))
    change, message = BAD_LM_EVAL_FILES[case]
    content = {**LM_EVAL_BASE, **change} if isinstance(change, dict) else LM_EVAL_BASE
    text = yaml.safe_dump({k: v for k, v in content.items() if v is not None}, allow_unicode=True)
    (tmp_path / "task.yaml").write_text(text + (change if isinstance(change, str) else ""), encoding="utf-8")
    load_task(str(write_yaml(tmp_path / "good.yaml", LM_EVAL_BASE)))  # the file without the change is fine
    with pytest.raises(ConfigError, match=f"task file 'task.yaml': .*{message}") as err:
        load_task("task.yaml")
    assert "\n" not in str(err.value)


def test_neither_task_file_format_says_what_each_needs(tmp_path):
    path = write_yaml(tmp_path / "what.yaml", {"file": "q.jsonl", "prompt_text": "x"})
    with pytest.raises(ConfigError, match="neither an igea task file .it needs 'path'.* nor an lm-eval task file "
                                          ".it needs 'dataset_path', 'doc_to_text'"):
        load_task(str(path))


def test_bad_lm_eval_rows_are_one_line_naming_the_row(tmp_path):
    rows = cloze_rows(2)
    questions = write_jsonl(tmp_path / "q.jsonl", [rows[0], {**rows[1], "answer": "forse"}])
    base = {**LM_EVAL_BASE, "dataset_kwargs": {"data_files": {"test": str(questions)}}}  # absolute: any cwd
    cases = [
        ({}, r"task 't': json \(test\) row 1: doc_to_target gives 'forse', not an index or one of the choices"),
        ({"doc_to_text": "{{domanda}}"}, r"row 0: doc_to_text: 'domanda' is undefined in template '\{\{domanda"),
        ({"doc_to_choice": "{{question}}"}, r"row 0: doc_to_choice gives '.*', not a list"),
        ({"test_split": "validation"}, r"task 't': cannot read 'json \(validation\)': Unknown split"),
        ({"num_fewshot": 3, "fewshot_split": "test"}, "num_fewshot=3 but split 'test' has only 2 examples"),
    ]
    for change, message in cases:
        with pytest.raises(IgeaError, match=message) as err:
            load_task(str(write_yaml(tmp_path / "t.yaml", {**base, **change})))
        assert "\n" not in str(err.value)


def test_lm_eval_task_file_through_the_cli_and_a_config(tmp_path, tiny_model_dir, capsys):
    from igea.cli import main
    from igea.config import config_from_dict

    questions = write_jsonl(tmp_path / "q.jsonl", cloze_rows(3))
    task = write_yaml(tmp_path / "cloze_it.yaml", {
        **LM_EVAL_BASE, "task": "cloze_it", "doc_to_text": "Domanda: {{question}}\nRisposta:",
        "dataset_kwargs": {"data_files": {"test": str(questions)}},
    })
    out = tmp_path / "results.json"
    assert main(["eval", str(tiny_model_dir), "--tasks", str(task), "--output", str(out)]) == 0
    assert "| cloze_it (0-shot) | - |" in capsys.readouterr().out
    result = json.loads(out.read_text(encoding="utf-8"))["models"][str(tiny_model_dir)]["tasks"]["cloze_it"]
    assert [p["gold"] for p in result["predictions"]] == [r["answer"] for r in cloze_rows(3)]
    cfg = {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"path": str(questions)},
           "training": {"output_dir": str(tmp_path / "run")}, "eval": {"tasks": [str(task)]}}
    assert config_from_dict(cfg).eval.tasks == [str(task)]
    with pytest.raises(ConfigError, match="eval.tasks: task file '.*nope.yaml' does not exist"):
        config_from_dict({**cfg, "eval": {"tasks": [str(tmp_path / "nope.yaml")]}})


# ----------------------------------------------------------------------------------------------------------
# Equality with lm-evaluation-harness


def hub_rows(style: str, rows: list[dict]) -> list[dict]:
    """Cloze questions in the columns of a built-in task's hub dataset (with okapi's [title] artifacts)."""
    out = []
    for i, r in enumerate(rows):
        c, gold = r["choices"], r["answer"]
        options, letter = {f"option_{x}": c[k] for k, x in enumerate("abcd")}, "ABCD"[gold]
        if style == "medmcqa_ita":
            out.append({"question": r["question"], **dict(zip(("opa", "opb", "opc", "opd"), c, strict=True)),
                        "cop": gold})
        elif style == "arc_it":
            out.append({"id": str(i), "instruction": r["question"] + " [title] perché?  Spiegare.", **options,
                        "option_e": None if i % 2 else "nessuna delle [step] precedenti", "answer": letter})
        elif style == "hellaswag_it":
            words = r["question"].split()
            out.append({"activity_label": "Medicina", "ctx_a": " ".join(words[:5]),
                        "ctx_b": " ".join(words[5:]), "endings": c, "label": str(gold)})
        else:
            out.append({"instruction": f"  {r['question']}? ", **options, "answer": letter})
    return out


LM_EVAL_TASKS = {  # built-in task -> (lm-eval task file, the splits its data files need, few-shot count)
    "medmcqa_ita": ("medmcqa/medmcqa.yaml", ("validation", "train"), 0),
    "arc_it": ("okapi/arc_multilingual/arc_it.yaml", ("test", "train", "validation"), 0),
    "hellaswag_it": ("okapi/hellaswag_multilingual/hellaswag_it.yaml", ("val",), 0),
    "mmlu_it": ("okapi/mmlu_multilingual/m_mmlu_it.yaml", ("test", "train"), 2),
}


def write_lm_eval_tasks(root: Path) -> tuple[Path, dict[str, Path]]:
    """Task YAMLs for lm-eval (in root/lm_eval) and igea (in root) over the same local jsonl files.

    Two generic tasks (`text` 1-shot from a separate file, `letters` 0-shot) and each built-in task, whose
    lm-eval definition is the installed one with only the data source swapped for local files.
    """
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    (root / "lm_eval").mkdir()
    questions = write_jsonl(root / "questions.jsonl", cloze_rows(12))
    shots = write_jsonl(root / "shots.jsonl", cloze_rows(3, offset=40))
    local = {"dataset_path": "json", "output_type": "multiple_choice", "doc_to_choice": "choices",
             "doc_to_target": "answer", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    write_yaml(root / "lm_eval" / "text.yaml", {
        **local, "task": "cloze_text", "doc_to_text": "Question: {{question}}\nAnswer:",
        "dataset_kwargs": {"data_files": {"test": str(questions), "train": str(shots)}},
        "test_split": "test", "training_split": "train", "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": 1,
    })
    write_yaml(root / "lm_eval" / "letters.yaml", {
        **local, "task": "cloze_letters", "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_text": "Question: {{question}}\nChoices:\n"
                       + "".join(f"{x}. {{{{choices[{k}]}}}}\n" for k, x in enumerate("ABCD")) + "Answer:",
        "dataset_kwargs": {"data_files": {"test": str(questions)}}, "test_split": "test",
    })
    ours = {
        "cloze_text": write_yaml(
            root / "cloze_text.yaml",
            {"path": "questions.jsonl", "fewshot_path": "shots.jsonl", "num_fewshot": 1},
        ),
        "cloze_letters": write_yaml(
            root / "cloze_letters.yaml", {"path": "questions.jsonl", "style": "letters"}
        ),
    }
    ours.update(write_lm_eval_task_files(root, root / "lm_eval"))
    for name, (definition, splits, shots_count) in LM_EVAL_TASKS.items():
        files = {
            split: str(write_jsonl(root / f"{name}_{split}.jsonl", hub_rows(name, cloze_rows(6, offset))))
            for split, offset in zip(splits, (0, 50, 60)[: len(splits)], strict=True)
        }
        wrapper = {"include": str(tasks_dir / definition), "task": f"{name}_local", "dataset_path": "json",
                   "dataset_name": None, "dataset_kwargs": {"data_files": files}}
        if shots_count:
            wrapper["num_fewshot"] = shots_count
        write_yaml(root / "lm_eval" / f"{name}.yaml", wrapper)
        spec = {"path": files[splits[0]], "style": name, "num_fewshot": shots_count}
        if "train" in files:
            spec["fewshot_path"] = files["train"]
        ours[f"{name}_local"] = write_yaml(root / f"{name}_local.yaml", spec)
    return root / "lm_eval", ours


def write_lm_eval_task_files(root: Path, out: Path) -> dict[str, Path]:
    """lm-eval task YAMLs that igea reads as they are, over local json and csv files.

    An Italian prompt with a description; 5-shot drawn at random (lm-eval's default sampler) from the scored
    split itself; 5-shot, first n of a training split, with other delimiters; letter choices with lettered
    options in the prompt, 1-shot from the scored (validation) split; choices and answer by templates.
    """
    questions = write_jsonl(root / "domande.jsonl", cloze_rows(12))
    train = write_jsonl(root / "esempi.jsonl", cloze_rows(8, offset=40))
    lettered = []
    for i, r in enumerate(cloze_rows(10, offset=20)):
        options = dict(zip(("opa", "opb", "opc", "opd"), r["choices"], strict=True))
        lettered.append({"topic": ["cardiologia", "oncologia"][i % 2], "question": r["question"], **options,
                         "letter": "ABCD"[r["answer"]], "index": r["answer"]})
    table = root / "lettere.csv"
    with table.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(lettered[0]))
        writer.writeheader()
        writer.writerows(lettered)
    json_files = {"dataset_path": "json", "output_type": "multiple_choice",
                  "dataset_kwargs": {"data_files": {"test": str(questions), "train": str(train)}}}
    csv_files = {"dataset_path": "csv", "output_type": "multiple_choice",
                 "dataset_kwargs": {"data_files": {"validation": str(table)}}, "validation_split": "validation"}
    options = "".join(f"{x}. {{{{{c}}}}}\n" for x, c in zip("ABCD", ("opa", "opb", "opc", "opd"), strict=True))
    files = {
        "lm_italian": {
            **json_files, "test_split": "test", "description": "Completa il testo biomedico.\n\n",
            "doc_to_text": "Domanda: {{question}}\nRisposta:", "doc_to_choice": "choices",
            "doc_to_target": "answer", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
        "lm_5shot_random": {
            **json_files, "test_split": "test", "fewshot_split": "test", "num_fewshot": 5,
            "doc_to_text": "question", "doc_to_choice": "choices", "doc_to_target": "answer",
        },
        "lm_5shot_first_n": {
            **json_files, "test_split": "test", "training_split": "train", "num_fewshot": 5,
            "fewshot_config": {"sampler": "first_n"}, "target_delimiter": ": ", "fewshot_delimiter": "\n---\n",
            "doc_to_text": "{{question | regex_replace('\\s+', ' ')}}", "doc_to_choice": "choices",
            "doc_to_target": "{{choices[answer]}}",
        },
        "lm_letters": {
            **csv_files, "num_fewshot": 1, "description": "Domande di {{topic}}.\n\n",
            "doc_to_text": "Domanda: {{question}}\n" + options + "Risposta:",
            "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "letter",
        },
        "lm_templates": {
            **csv_files, "doc_to_text": "{{question}}?", "doc_to_choice": "{{[opa, opb, opc, opd]}}",
            "doc_to_target": "{{index}}", "task_alias": "Template",
        },
    }
    return {name: write_yaml(out / f"{name}.yaml", {"task": name, **content}) for name, content in files.items()}


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory, tiny_model_dir):
    """lm-eval's `hf` model on the tiny model directory, over every test task, with per-item samples."""
    pytest.importorskip("lm_eval")
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        lm_eval_dir, ours = write_lm_eval_tasks(tmp_path_factory.mktemp("mc"))
        results = simple_evaluate(
            model="hf", model_args={"pretrained": str(tiny_model_dir)}, tasks=list(ours),
            task_manager=TaskManager(include_path=str(lm_eval_dir), include_defaults=False), batch_size=4,
            device="cpu", log_samples=True,
        )
    return results, ours


LM_EVAL_FILES = ["lm_italian", "lm_5shot_random", "lm_5shot_first_n", "lm_letters", "lm_templates"]


@pytest.mark.parametrize("name", ["cloze_text", "cloze_letters", *(f"{t}_local" for t in LM_EVAL_TASKS),
                                  *LM_EVAL_FILES])
def test_same_prompts_choices_and_scores_as_lm_evaluation_harness(name, lm_eval_run, model_and_tokenizer):
    results, ours = lm_eval_run
    model, tokenizer = model_and_tokenizer
    task = load_task(str(ours[name]))
    result = run_tasks(model, tokenizer, [str(ours[name])], EvalConfig(batch_size=3))[name]
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    assert len(samples) == len(result["predictions"]) == len(task.items)
    for (context, continuations), sample, row in zip(task.requests(), samples, result["predictions"],
                                                     strict=True):
        assert [tuple(a) for a in sample["arguments"]] == [(context, c) for c in continuations]
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert row["loglikelihoods"] == pytest.approx(theirs, abs=1e-4)
        assert row["pred"] == int(np.argmax(theirs))
        assert float(row["pred"] == row["gold"]) == sample["acc"]
        if "acc_norm" in sample:
            assert float(row["pred_norm"] == row["gold"]) == sample["acc_norm"]
        else:  # lm-eval's m_mmlu reports acc only; with one-letter choices acc_norm is acc
            assert row["pred_norm"] == row["pred"]
    summary = results["results"][name]
    assert result["acc"] == pytest.approx(summary["acc,none"])
    assert result["acc_stderr"] == pytest.approx(summary["acc_stderr,none"])
    if "acc_norm,none" in summary:
        assert result["acc_norm"] == pytest.approx(summary["acc_norm,none"])
        assert result["acc_norm_stderr"] == pytest.approx(summary["acc_norm_stderr,none"])


# ----------------------------------------------------------------------------------------------------------
# Benchmark smoke run


@pytest.mark.slow
def test_benchmark_quick_run(tmp_path):
    pytest.importorskip("lm_eval")
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_mc_eval.py"), "--quick", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "speedup" in out.stdout
