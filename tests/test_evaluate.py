"""Held-out evaluation (`igea.evaluate`, `igea eval`): metrics equal a direct forward pass on the blocks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from igea.cli import main
from igea.config import DataConfig
from igea.errors import ConfigError, IgeaError
from igea.evaluate import evaluate

from conftest import real_abstracts

BLOCK = 64


@pytest.fixture(scope="module")
def held_out_file(tmp_path_factory):
    """Four real abstracts as jsonl (`text` column): some forty blocks of 64 tokens."""
    path = tmp_path_factory.mktemp("held_out") / "test.jsonl"
    rows = [{"pmid": str(i), "text": t} for i, t in enumerate(real_abstracts("test", limit=4))]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with perturbed weights (same tokenizer): a second model to compare with."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.05)
    out = tmp_path_factory.mktemp("other") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def documents_tokens(tokenizer, path) -> list[list[int]]:
    """Each document's ids followed by EOS, as data.document_boundary: eos makes them."""
    texts = [json.loads(line)["text"].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def direct_metrics(model_dir, segments: list[list[int]]) -> dict[str, float]:
    """Loss and accuracy of independent forward passes over `segments`, every next token counted once."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, correct, counted = 0.0, 0, 0
    with torch.no_grad():
        for segment in segments:
            if len(segment) < 2:
                continue
            ids = torch.tensor([segment])
            out = model(ids, labels=ids)
            n = len(segment) - 1
            nll += out.loss.item() * n
            correct += int((out.logits[0, :-1].argmax(-1) == ids[0, 1:]).sum())
            counted += n
    return {"loss": nll / counted, "accuracy": correct / counted, "tokens": counted}


def test_held_out_metrics_equal_a_direct_forward_pass_on_hand_packed_blocks(tiny_model_dir, held_out_file):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    stream = [t for doc in documents_tokens(tokenizer, held_out_file) for t in doc]
    blocks = [stream[i : i + BLOCK] for i in range(0, len(stream) - BLOCK + 1, BLOCK)]
    expected = direct_metrics(tiny_model_dir, blocks)

    results = evaluate(str(tiny_model_dir), corpus=str(held_out_file), block_size=BLOCK)
    got = results["models"][str(tiny_model_dir)]["held_out"]
    assert results["held_out_data"]["blocks"] == len(blocks)
    assert results["held_out_data"]["remainder"] == len(stream) % BLOCK
    assert got["tokens"] == expected["tokens"] == len(blocks) * (BLOCK - 1)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(torch.tensor(expected["loss"]).exp().item(), rel=1e-5)
    assert got["accuracy"] == expected["accuracy"]


def test_documents_packing_never_predicts_across_documents(tiny_model_dir, held_out_file):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    segments, filled, complete, total = [], 0, 0, 0
    for doc in documents_tokens(tokenizer, held_out_file):  # cut each document at block boundaries
        while doc:
            take = doc[: BLOCK - filled]
            segments.append(take)
            filled, doc = filled + len(take), doc[len(take):]
            if filled == BLOCK:
                filled, complete, total = 0, len(segments), total + BLOCK
    segments = segments[:complete]  # the unfinished last block is dropped
    expected = direct_metrics(tiny_model_dir, segments)

    data = DataConfig(path=str(held_out_file), block_size=BLOCK, packing="documents")
    results = evaluate(str(tiny_model_dir), corpus=data)
    got = results["models"][str(tiny_model_dir)]["held_out"]
    assert got["tokens"] == expected["tokens"] < total - total // BLOCK
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert got["accuracy"] == expected["accuracy"]


def test_compare_scores_both_models_on_the_same_blocks(tiny_model_dir, other_model_dir, held_out_file):
    alone = evaluate(str(other_model_dir), corpus=str(held_out_file), block_size=BLOCK)
    both = evaluate(str(tiny_model_dir), corpus=str(held_out_file), compare=str(other_model_dir),
                    block_size=BLOCK)
    model, base = (both["models"][str(p)]["held_out"] for p in (tiny_model_dir, other_model_dir))
    assert base == alone["models"][str(other_model_dir)]["held_out"]
    assert model["loss"] != base["loss"]
    for key in ("loss", "perplexity", "accuracy"):
        assert both["change"]["held_out"][key] == pytest.approx(model[key] - base[key])


def test_a_run_directory_packs_as_its_run_did(tmp_path, tiny_model_dir, held_out_file):
    run_dir = shutil.copytree(tiny_model_dir, tmp_path / "run")
    run_config = {"config": {"data": {"block_size": 32, "packing": "blocks"}}}
    (run_dir / "igea_run.json").write_text(json.dumps(run_config))
    results = evaluate(str(run_dir), corpus=str(held_out_file))
    data = results["held_out_data"]
    assert data["block_size"] == 32
    assert data["blocks"] == data["tokens"] // 32
    assert results["models"][str(run_dir)]["held_out"]["tokens"] == data["blocks"] * 31


def test_the_blocks_go_where_cache_dir_says(tiny_model_dir, held_out_file, tmp_path, capsys):
    """`igea eval --cache-dir DIR` and `evaluate(..., cache_dir=DIR)` prepare the held-out blocks in
    DIR/igea-blocks, not in the datasets cache of the home directory (a small or shared one on a cluster)."""
    api = evaluate(str(tiny_model_dir), corpus=str(held_out_file), block_size=BLOCK, cache_dir=tmp_path / "api")
    prepared = list((tmp_path / "api" / "igea-blocks").glob("*/prepared.json"))
    assert len(prepared) == 1
    assert main(["eval", str(tiny_model_dir), "--corpus", str(held_out_file), "--block-size", str(BLOCK),
                 "--cache-dir", str(tmp_path / "cli")]) == 0
    assert [p.parent.name for p in (tmp_path / "cli" / "igea-blocks").glob("*/prepared.json")] == [
        prepared[0].parent.name]  # the same key: the same blocks, kept where asked
    assert f"{api['models'][str(tiny_model_dir)]['held_out']['loss']:.4f}" in capsys.readouterr().out


def test_errors_are_one_clear_line(tiny_model_dir, held_out_file, tmp_path):
    with pytest.raises(ConfigError, match=r"block_size: 1024 is longer than the context of .* \(512 pos"):
        evaluate(str(tiny_model_dir), corpus=str(held_out_file), block_size=1024)
    short = tmp_path / "short.txt"
    short.write_text("Il fegato è una ghiandola.\n", encoding="utf-8")
    with pytest.raises(IgeaError, match=r"corpus: \d+ tokens, fewer than one block of 512"):
        evaluate(str(tiny_model_dir), corpus=str(short), block_size=512)
    with pytest.raises(IgeaError, match="nothing to do; give a held-out corpus, tasks, or both"):
        evaluate(str(tiny_model_dir))


# ----------------------------------------------------------------------------------------------------------
# igea eval


def test_cli_prints_metrics_and_table_and_writes_predictions(tiny_model_dir, held_out_file, tmp_path, capsys):
    questions = tmp_path / "cloze.jsonl"
    rows = [
        {"question": "Il fegato è", "choices": ["una ghiandola", "un osso", "un virus"], "answer": 0},
        {"question": "La fibrosi cistica è causata da", "choices": ["mutazioni del gene CFTR", "il freddo"],
         "answer": "A"},
    ]
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "results.json"
    code = main(["eval", str(tiny_model_dir), "--corpus", str(held_out_file), "--tasks", str(questions),
                 "--block-size", str(BLOCK), "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    saved = json.loads(out.read_text(encoding="utf-8"))
    result = saved["models"][str(tiny_model_dir)]
    assert [p["gold"] for p in result["tasks"]["cloze"]["predictions"]] == [0, 0]
    assert f"{result['held_out']['loss']:.4f}" in printed
    assert "| Dataset | Domain |" in printed and "| cloze (0-shot) | - |" in printed


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "medqa"], "igea: error: --tasks: unknown task 'medqa'; known tasks: arc_it, hellaswag_it"),
    ([], "igea: error: evaluate: nothing to do"),
    (["--tasks", "arc_it", "--limit", "-1"], "igea: error: --limit: -1 is not allowed; it must be >= 0"),
])
def test_cli_errors_exit_2_with_one_line(tiny_model_dir, capsys, args, message):
    assert main(["eval", str(tiny_model_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_cli_output_mentions_predictions_only_when_there_are_questions(tiny_model_dir, corpus_file, tmp_path,
                                                                        capsys):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(corpus_file.read_text(encoding="utf-8").splitlines()[:20]) + "\n", encoding="utf-8")
    assert main(["eval", str(tiny_model_dir), "--corpus", str(held_out), "--output", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "results written to" in out and "per-question" not in out
    assert "held_out" in json.loads((tmp_path / "r.json").read_text())["models"][str(tiny_model_dir)]
