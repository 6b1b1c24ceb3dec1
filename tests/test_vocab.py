"""Domain vocabulary (igea.vocab, `igea vocab`, `model.extend_vocabulary`): new tokens are used where they
should be and nowhere else, old ids and rows stay, new rows start from their pieces' rows, and the result trains."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer, MistralConfig, MistralForCausalLM

import igea
from igea.basemodel import base_model_path, load_tokenizer
from igea.cli import main
from igea.config import config_from_dict
from igea.newrows import FIT_DOCUMENTS, default_fit_documents, read_with_base, resize_and_initialise
from igea.progress import Progress, in_log_file
from igea.vocab import REPORT, hold_out, words

from conftest import TRAITS, build_trait_model, config_dict, make_config, real_abstracts, write_config

NUM_TOKENS = 150


@pytest.fixture(scope="module")
def extended(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny byte-level model extended with NUM_TOKENS tokens learned on the train abstracts."""
    out = tmp_path_factory.mktemp("vocab") / "extended"
    report = igea.extend_vocabulary(str(tiny_model_dir), real_abstracts("train"), NUM_TOKENS, out,
                                    heldout_texts=real_abstracts("test", 40))
    return out, report


def bpe_reference(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE by the book: merge the lowest-ranked adjacent pair (leftmost first) until no pair has a rank."""
    while True:
        ranked = [(ranks[p], i) for i, p in enumerate(zip(pieces, pieces[1:], strict=False)) if p in ranks]
        if not ranked:
            return pieces
        _, i = min(ranked)
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2:]]


def new_merges(base_dir: Path, extended_dir: Path) -> dict[tuple[str, str], int]:
    """The merge rules the extension appended to the base tokenizer's, with their ranks among themselves."""
    def merges(path: Path) -> list:
        return json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]

    base, extended = merges(base_dir), merges(extended_dir)
    assert extended[:len(base)] == base
    return {tuple(m.split(" ") if isinstance(m, str) else m): rank for rank, m in enumerate(extended[len(base):])}


def check_segmentation(base_dir: Path, extended_dir: Path, texts: list[str]) -> int:
    """The extended tokenizer encodes each text word by word, each word as the base tokenizer segments it
    followed by the new merges in order; returns how many new tokens the texts got."""
    base, ext = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(extended_dir)
    ranks = new_merges(base_dir, extended_dir)
    used = 0
    for text in texts:
        expected = [piece for word in words(base, text)
                    for piece in bpe_reference([t.value for t in base.backend_tokenizer.model.tokenize(word)], ranks)]
        ids = ext(text, add_special_tokens=False)["input_ids"]
        assert ext.convert_ids_to_tokens(ids) == expected, text
        used += sum(i >= len(base) for i in ids)
    return used


# ----------------------------------------------------------------------------------------------------------
# The byte-level tiny model (GPT-2 style: 'Ġ' marks a preceding space)


def test_new_tokens_segment_running_text_as_continued_bpe(tiny_model_dir, extended):
    out, report = extended
    test = real_abstracts("test", 40)
    used = check_segmentation(tiny_model_dir, out, test)
    assert used > 1000
    ext = AutoTokenizer.from_pretrained(out)
    for text in test:
        assert ext.decode(ext(text, add_special_tokens=False)["input_ids"]) == text
    # a word after a space gets its token whatever follows it
    word = next(t["text"].strip() for t in report["new_tokens"] if t["token"].startswith("Ġ") and len(t["text"]) > 6)
    for text in (f"Lo studio {word}.", f"Lo studio {word}, poi", f"Lo studio {word}\nNuovo", f"Lo studio {word}"):
        assert ext.convert_tokens_to_ids("Ġ" + word) in ext(text)["input_ids"], text


def test_old_ids_and_old_rows_are_unchanged(tiny_model_dir, extended):
    out, report = extended
    base, ext = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(out)
    base_vocab, ext_vocab = base.get_vocab(), ext.get_vocab()
    assert {t: ext_vocab[t] for t in base_vocab} == base_vocab
    assert len(ext) == len(base) + NUM_TOKENS == report["vocab_size"]["after"]
    assert sorted(t["id"] for t in report["new_tokens"]) == list(range(len(base), len(ext)))
    assert (ext.eos_token_id, ext.pad_token_id, ext.bos_token_id) == (base.eos_token_id, base.pad_token_id,
                                                                       base.bos_token_id)
    old, new = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(out)
    n = len(base)
    assert new.config.vocab_size == len(ext) == new.get_input_embeddings().num_embeddings
    assert torch.equal(new.get_input_embeddings().weight[:n], old.get_input_embeddings().weight)
    assert torch.equal(new.get_output_embeddings().weight[:n], old.get_output_embeddings().weight)
    with torch.no_grad():  # text without new tokens gets the same logits
        ids = base("Il", return_tensors="pt")["input_ids"]
        assert torch.allclose(new(ids).logits[..., :n], old(ids).logits, atol=1e-5)


def start_model(base_dir: Path, report: dict, contexts: dict | None = None) -> torch.nn.Module:
    """The base model grown for the report's new tokens, their rows as `resize_and_initialise` starts them
    from `contexts` (before the distillation); without contexts, the weighted means (tied: the mean)."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    resize_and_initialise(model, [t["id"] for t in report["new_tokens"]],
                          [tokenizer.convert_tokens_to_ids(t["pieces"]) for t in report["new_tokens"]], contexts)
    return model


def base_reading(base_dir: Path, extended_dir: Path, report: dict, texts: list[str]):
    """`read_with_base` of `texts` with the base model, for the report's new tokens."""
    base_tok, extended_tok = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(extended_dir)
    pieces = {t["id"]: base_tok.convert_tokens_to_ids(t["pieces"]) for t in report["new_tokens"]}
    return read_with_base(AutoModelForCausalLM.from_pretrained(base_dir), base_tok, extended_tok, texts, pieces)


def test_new_input_rows_start_as_weighted_means_of_their_pieces(tiny_model_dir, extended):
    """Each piece weighs twice the one before it (what the model has read when the word ends)."""
    _, report = extended
    base = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight
    after = start_model(tiny_model_dir, report).get_input_embeddings().weight
    for token in report["new_tokens"]:
        ids = base.convert_tokens_to_ids(token["pieces"])
        assert "".join(token["pieces"]) == token["token"] and len(ids) >= 2
        weights = torch.tensor([2.0 ** i for i in range(len(ids))])
        assert torch.allclose(after[token["id"]], weights / weights.sum() @ before[ids], atol=1e-6)


def chain_fit_errors(base_dir: Path, extended_dir: Path, report: dict, texts: list[str]) -> tuple[float, float, int]:
    """Mean |logit - chain logit| of the new tokens where they occur in `texts`: with the output rows fitted
    to them, and with the rows the fit starts from (weighted means, first piece heaviest; tied: the mean)."""
    contexts = base_reading(base_dir, extended_dir, report, texts).contexts
    fitted = start_model(base_dir, report, contexts).get_output_embeddings().weight
    start = start_model(base_dir, report).get_output_embeddings().weight
    errors_fit, errors_start = [], []
    with torch.no_grad():
        for token, (hidden, chain) in contexts.items():
            errors_fit.append((hidden @ fitted[token] - chain).abs().mean())
            errors_start.append((hidden @ start[token] - chain).abs().mean())
    return float(torch.stack(errors_fit).mean()), float(torch.stack(errors_start).mean()), len(contexts)


def test_new_output_rows_are_fitted_to_the_chain_of_pieces_logit_where_the_token_occurs(tiny_model_dir, extended):
    """The extended model should predict a new token as the base model predicted its pieces: where the token
    occurs in the corpus, its logit is fitted to the first piece's logit plus the log-probability of the
    other pieces after it."""
    out, report = extended
    fit, start, fitted = chain_fit_errors(tiny_model_dir, out, report, real_abstracts("train"))
    assert fitted == report["fitted_tokens"] > 0.9 * report["tokens_added"]
    assert fit < 0.5 * start, (fit, start)


@torch.no_grad()
def shortfall(model: torch.nn.Module, documents: list) -> float:
    """Mean squared shortfall of `model`'s log-probability of each extended token below the base model's of
    its pieces (`BaseReading.documents`): what the distillation makes small."""
    total, count = 0.0, 0
    for ids, target in documents:
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
        logp = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        total += float(((target - logp).clamp_min(0) ** 2).sum())
        count += len(target)
    return total / count


def check_distilled(base_dir: Path, extended_dir: Path, report: dict, texts: list[str], heldout: list[str]) -> None:
    """Only the new rows moved, and on held-out text the extended model now falls short of the base model's
    log-probabilities less than with the rows the distillation started from (fitted on `texts`)."""
    base, model = AutoModelForCausalLM.from_pretrained(base_dir), AutoModelForCausalLM.from_pretrained(extended_dir)
    rows = len(AutoTokenizer.from_pretrained(base_dir))
    new_params = dict(model.named_parameters())
    for name, parameter in base.named_parameters():
        assert torch.equal(new_params[name][:rows] if "embed" in name or "lm_head" in name else new_params[name],
                           parameter), name
    documents = base_reading(base_dir, extended_dir, report, heldout).documents
    contexts = base_reading(base_dir, extended_dir, report, texts).contexts
    start = start_model(base_dir, report, contexts)
    start_rows = start.get_input_embeddings().weight[rows:]
    assert not torch.equal(model.get_input_embeddings().weight[rows:], start_rows)
    after, before = shortfall(model, documents), shortfall(start, documents)
    assert after < 0.9 * before, (after, before)
    assert report["distillation"]["loss"]["change"] < -0.1
    assert report["distillation"]["steps"] == math.ceil(report["distillation"]["documents"] / 4)


def test_new_rows_alone_are_distilled_from_the_base_model(tiny_model_dir, extended):
    out, report = extended
    check_distilled(tiny_model_dir, out, report, real_abstracts("train"), real_abstracts("test", 40))


def test_tied_rows_are_fitted_and_distilled_too_and_stay_one_matrix(tmp_path):
    texts = real_abstracts("train")
    base_dir = build_trait_model("tied", texts, tmp_path / "tied")
    report = igea.extend_vocabulary(str(base_dir), texts, 60, tmp_path / "ext", heldout_texts=texts[:5])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ext")
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    fit, start, fitted = chain_fit_errors(base_dir, tmp_path / "ext", report, texts)
    assert fitted == report["fitted_tokens"] > 0 and fit < 0.5 * start, (fit, start)
    check_distilled(base_dir, tmp_path / "ext", report, texts, real_abstracts("test", 40))


@pytest.mark.parametrize("trait", TRAITS)
def test_every_model_trait_is_extended_and_distilled(trait, tmp_path, monkeypatch):
    """Tied embeddings, byte-level BPE, a tokenizer that adds BOS itself, over 65,536 ids, a sliding window:
    each gets its tokens, keeps its tie, and has its new rows distilled (on 100 documents of 64 tokens: a
    70,000-row output layer makes each step costly on a CPU)."""
    monkeypatch.setattr("igea.newrows.FIT_CONTEXT", 64)
    texts, heldout = real_abstracts("train", 200), real_abstracts("test", 3)
    base_dir = build_trait_model(trait, texts, tmp_path / trait)
    out = tmp_path / "ext"
    report = igea.extend_vocabulary(str(base_dir), texts, 40, out, heldout_texts=heldout, measure_bits_per_byte=True,
                                    fit_documents=100)
    assert report["tokens_added"] == 40 and report["fertility"]["change"] < 0
    assert math.isfinite(report["bits_per_byte"]["after"])
    base, extended = AutoModelForCausalLM.from_pretrained(base_dir), AutoModelForCausalLM.from_pretrained(out)

    def tied(model) -> bool:
        return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    assert tied(extended) == tied(base) == (trait == "tied")
    new_ids = sorted(t["id"] for t in report["new_tokens"])
    assert new_ids == list(range(len(AutoTokenizer.from_pretrained(base_dir)), len(AutoTokenizer.from_pretrained(out))))
    assert new_ids[0] > 65_535 if trait == "vocab70k" else new_ids[-1] < 65_536
    check_distilled(base_dir, out, report, texts[:100], heldout)


def test_fertility_drops_on_held_out_text(tiny_model_dir, extended):
    out, report = extended
    test = real_abstracts("test", 40)
    before = igea.fertility(AutoTokenizer.from_pretrained(tiny_model_dir), test)
    after = igea.fertility(AutoTokenizer.from_pretrained(out), test)
    assert report["fertility"]["before"] == pytest.approx(before) and report["fertility"]["after"] == after
    assert after < 0.9 * before
    assert report["corpus_tokens"]["after"] < report["corpus_tokens"]["before"]
    assert report["heldout_documents"] == 40 and report["tokens_added"] == NUM_TOKENS


@pytest.mark.slow
def test_extended_model_trains_as_model_name_or_path(tmp_path, extended, corpus_file):
    out, _ = extended
    path = write_config(tmp_path, "run", out, corpus_file, max_steps=3, eval_steps=3, save_steps=3)
    result = igea.train(igea.load_config(path))
    assert math.isfinite(result.metrics["after"]["eval_loss"])
    assert result.metrics["after"]["eval_loss"] < result.metrics["before"]["eval_loss"]
    assert len(AutoTokenizer.from_pretrained(result.output_dir)) == len(AutoTokenizer.from_pretrained(out))


def test_bits_per_byte_scores_every_token_once_in_windows_or_whole(tiny_model_dir):
    """With attention and MLP outputs zeroed, a token's loss does not depend on its context: scoring a text
    whole or in windows must then give the same total, and it is the model's own loss times the tokens."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [t[:800] for t in real_abstracts("test", 3)]
    whole = igea.bits_per_byte(model, tokenizer, texts)
    ids = [[tokenizer.eos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts]
    assert max(map(len, ids)) < model.config.max_position_embeddings
    with torch.no_grad():
        nats = sum(model(torch.tensor([x]), labels=torch.tensor([x])).loss.item() * (len(x) - 1) for x in ids)
    assert whole == pytest.approx(nats / math.log(2) / sum(len(t.encode("utf-8")) for t in texts), rel=1e-5)
    model.config.max_position_embeddings = 32  # windows of 32 tokens, half of them history
    assert igea.bits_per_byte(model, tokenizer, texts) == pytest.approx(whole, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# A SentencePiece-style tokenizer ('▁' word starts, byte fallback: Mistral, Llama 2, Minerva)


@pytest.fixture(scope="module", params=["metaspace", "legacy"])
def sentencepiece_model(request, tmp_path_factory) -> tuple[Path, str]:
    """A Llama-style BPE tokenizer (byte fallback) and a tiny Mistral with tied embeddings.

    `metaspace`: '▁' comes from a Metaspace pre-tokenizer (transformers 5's LlamaTokenizer); `legacy`: from a
    normalizer, with no pre-tokenizer (the tokenizer.json of Mistral 7B v0.1 and Llama 2).
    """
    core = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    special = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    core.train_from_iterator(real_abstracts("train", 200), trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, show_progress=False))
    spec = json.loads(core.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]])
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                           tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("sp") / "model"
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    if request.param == "legacy":
        path = out / "tokenizer.json"
        spec = json.loads(path.read_text(encoding="utf-8"))
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ]}
        spec["pre_tokenizer"] = None
        path.write_text(json.dumps(spec), encoding="utf-8")
        assert AutoTokenizer.from_pretrained(out).backend_tokenizer.pre_tokenizer is None
    return out, request.param


def test_sentencepiece_style_tokenizer_is_extended_within_words(sentencepiece_model, tmp_path):
    sentencepiece_model_dir, style = sentencepiece_model
    out = tmp_path / "ext"
    report = igea.extend_vocabulary(str(sentencepiece_model_dir), real_abstracts("train"), 100, out,
                                    heldout_texts=real_abstracts("test", 20))
    assert report["tokens_added"] == 100 and report["fertility"]["change"] < -0.03
    assert all("\u2581" not in t["token"][1:] and not t["token"].startswith("<0x") for t in report["new_tokens"])
    test = real_abstracts("test", 20)
    assert check_segmentation(sentencepiece_model_dir, out, test) > 100
    auto = AutoTokenizer.from_pretrained(out)
    for text in test:
        assert auto.decode(auto(text, add_special_tokens=False)["input_ids"]) == text
    if style == "metaspace":  # LlamaTokenizer rebuilds its pipeline from the vocab and merges of tokenizer.json
        llama = LlamaTokenizer.from_pretrained(out)
        assert all(auto(text)["input_ids"] == llama(text)["input_ids"] for text in test)
    word = next(t for t in report["new_tokens"] if t["token"].startswith("\u2581") and len(t["token"]) > 5)
    assert word["id"] in auto(f"Nello studio {word['token'][1:]}, poi.")["input_ids"]  # followed by punctuation
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    fit, start, fitted = chain_fit_errors(sentencepiece_model_dir, out, report, real_abstracts("train"))
    assert fitted == report["fitted_tokens"] > 90 and fit < 0.5 * start, (fit, start)  # '▁' pieces line up too


# ----------------------------------------------------------------------------------------------------------
# igea vocab


def test_cli_writes_an_extended_model_and_its_report(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "ext"
    assert main(["vocab", str(tiny_model_dir), "--corpus", str(corpus_file), "--num-tokens", "40",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"untrained, it scores \d\.\d{4} bits per byte on \d+ held-out documents, the base model "
                     r"\d\.\d{4} \([+-]\d+\.\d%\)", printed), printed
    summary = json.loads(printed[:printed.rindex("}") + 1])
    saved = json.loads((out / REPORT).read_text(encoding="utf-8"))
    assert summary["tokens_added"] == saved["tokens_added"] == 40 and len(saved["new_tokens"]) == 40
    assert summary["documents"] + summary["heldout_documents"] == len(real_abstracts("train"))
    assert summary["heldout_documents"] == round(0.05 * len(real_abstracts("train")))
    assert summary["fertility"]["after"] < summary["fertility"]["before"]
    _, heldout = hold_out(corpus_file.read_text(encoding="utf-8").splitlines())  # the documents left out
    assert summary["fertility"]["before"] == igea.fertility(AutoTokenizer.from_pretrained(tiny_model_dir), heldout)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = igea.bits_per_byte(base, AutoTokenizer.from_pretrained(tiny_model_dir), heldout)
    assert summary["bits_per_byte"]["before"] == pytest.approx(expected, rel=1e-6)
    assert summary["bits_per_byte"]["documents"] == len(heldout) and 0 < summary["bits_per_byte"]["after"] < 16
    assert (out / "model.safetensors").is_file() and not (out.parent / "ext.tmp").exists()


def test_cli_without_bits_per_byte_scores_nothing(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "ext"
    assert main(["vocab", str(tiny_model_dir), "--corpus", str(corpus_file), "--num-tokens", "20",
                 "--output", str(out), "--no-bits-per-byte"]) == 0
    assert "bits per byte" not in capsys.readouterr().out
    assert "bits_per_byte" not in json.loads((out / REPORT).read_text(encoding="utf-8"))


PHASES = [  # (the line a phase starts with, the line it ends with), in order
    ("reading the corpus", "corpus read in"),
    ("counting the words of", "counting words: done in"),
    ("corpus: ", "learning merges: done in"),
    ("loading ", "model loaded in"),
    ("saving the extended tokenizer", "extended tokenizer saved in"),
    ("the base model reads 6 documents", "the base model's reading: done in"),
    ("the ridge fit: ", "new rows ready in"),
    ("distilling the new rows on 6 documents, 4 at a time (2 steps)", "the distillation: done in"),
    ("saving the extended model", "extended model saved in"),
    ("measuring fertility", "fertility measured in"),
    ("bits per byte, extended model: scoring 3 documents", "bits per byte, extended model: done in"),
    ("bits per byte, base model: scoring 3 documents", "bits per byte, base model: done in"),
]


def test_cli_logs_each_phase_with_its_time_and_progress_within_the_long_ones(tiny_model_dir, corpus_file, tmp_path,
                                                                              caplog, monkeypatch):
    """In a log file (stderr not a terminal, as under pytest) each phase says when it starts and how long it took,
    and the long ones say how far they are (here at every step instead of every 30 s); the fit's size and why."""
    monkeypatch.setitem(Progress.__init__.__kwdefaults__, "every", 0.0)
    assert in_log_file()
    caplog.set_level(logging.INFO)
    assert main(["vocab", str(tiny_model_dir), "--corpus", str(corpus_file), "--num-tokens", "20", "--output",
                 str(tmp_path / "ext"), "--fit-documents", "6", "--bits-per-byte-documents", "3"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("igea")]
    at = 0
    for start, end in PHASES:
        began = next(i for i, line in enumerate(lines) if i >= at and line.startswith(start))
        at = next(i for i, line in enumerate(lines) if i > began and line.startswith(end))
        assert re.fullmatch(r".* in (\d+\.\d s|\d+ s|\d+m\d\ds)", lines[at]), lines[at]
    assert any(re.fullmatch(r"the distillation: 50% \(1/2 steps\) \| .*, ETA .*", line) for line in lines), lines
    assert any(re.fullmatch(r"the base model's reading: 50% \(3/6 documents\) \| .*", line) for line in lines)
    assert any(line.startswith("the fit and the distillation read the first 6 of ") and "--fit-documents 6" in line
               for line in lines)
    assert not any("%|" in line for line in caplog.text.splitlines())  # no progress bar drawn in a log


def test_no_fit_documents_keeps_the_start_rows_and_reads_nothing(tiny_model_dir, tmp_path, caplog):
    """`fit_documents=0`: no forward pass, no fit, no distillation; the new rows are the weighted means."""
    caplog.set_level(logging.INFO)
    texts = real_abstracts("train", 100)
    out = tmp_path / "ext"
    report = igea.extend_vocabulary(str(tiny_model_dir), texts, 30, out, heldout_texts=texts[:5], fit_documents=0)
    assert report["fit"]["documents"] == report["fit"]["documents_read"] == report["fitted_tokens"] == 0
    assert report["distillation"] is None and "not fitted, not distilled" in report["init"]
    assert not any("base model reads" in r.getMessage() or "distilling" in r.getMessage() for r in caplog.records)
    start, saved = start_model(tiny_model_dir, report), AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(saved.get_input_embeddings().weight, start.get_input_embeddings().weight)
    assert torch.equal(saved.get_output_embeddings().weight, start.get_output_embeddings().weight)


def test_fit_documents_bounds_what_the_fit_and_the_distillation_read(tiny_model_dir, tmp_path, monkeypatch):
    texts = real_abstracts("train", 100)
    read = []
    real = igea.vocab.read_with_base
    monkeypatch.setattr("igea.vocab.read_with_base", lambda *a, **k: read.append(list(a[3])) or real(*a, **k))
    report = igea.extend_vocabulary(str(tiny_model_dir), texts, 30, tmp_path / "ext", heldout_texts=texts[:5],
                                    fit_documents=7)
    assert read == [texts[:7]]
    assert report["fit"]["documents"] == 7 and report["fit"]["asked"] == 7
    assert 0 < report["fit"]["documents_read"] == report["distillation"]["documents"] <= 7
    assert report["distillation"]["steps"] == math.ceil(report["distillation"]["documents"] / 4)
    assert 0 < report["fitted_tokens"] <= report["tokens_added"]


def test_default_fit_on_a_cpu_shrinks_with_the_model(tiny_model_dir, monkeypatch):
    """A GPU reads FIT_DOCUMENTS; a CPU as many for a small model, fewer for a large one, fewer still for larger."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert default_fit_documents(model)[0] == FIT_DOCUMENTS
    sizes = {}
    for parameters in (135e6, 1e9):
        monkeypatch.setattr(model, "num_parameters", lambda parameters=parameters: int(parameters))
        sizes[parameters], why = default_fit_documents(model)
        assert "CPU" in why and f"{parameters / 1e6:,.0f}M parameters" in why
    assert FIT_DOCUMENTS > sizes[135e6] > sizes[1e9] >= 0


@pytest.mark.parametrize("args, message", [
    (["--num-tokens", "0"], "--num-tokens: 0 is not allowed"),
    (["--corpus", "missing/*.txt"], "--corpus: no file matches 'missing/*.txt'"),
    (["--output", "{full}"], "output: directory '{full}' is not empty"),
    (["--fit-documents", "-1"], "--fit-documents: -1 is not allowed; it must be >= 0"),
    (["--bits-per-byte-documents", "0"], "--bits-per-byte-documents: 0 is not allowed; it must be at least 1"),
    (["--device", "banana"], "--device: 'banana' is not a device"),
    (["--device", "cuda"], "--device: 'cuda' cannot be used: no CUDA device is available here"),
])
def test_cli_errors_are_one_line_and_exit_2(tiny_model_dir, corpus_file, tmp_path, capsys, args, message):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    if args[0] == "--device" and torch.cuda.is_available() and args[1] == "cuda":
        pytest.skip("this machine has a CUDA device")
    argv = {"--corpus": str(corpus_file), "--num-tokens": "10", "--output": str(tmp_path / "out")}
    argv.update(dict(zip(args[::2], (a.format(full=full) for a in args[1::2]), strict=True)))
    assert main(["vocab", str(tiny_model_dir), *(x for kv in argv.items() for x in kv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"igea: error: {message.format(full=full)}")
    assert (full / "keep.txt").read_text() == "mine" and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# model.extend_vocabulary


@pytest.mark.slow
def test_run_builds_the_extended_base_model_once_and_trains_it(tiny_model_dir, corpus_file, tmp_path):
    training = {"max_steps": 2, "eval_steps": 2, "save_steps": 2}
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, training=training, data={"validation_split": 5},
                      eval={"before_training": False}, model={"extend_vocabulary": {"num_tokens": 30}})
    result = igea.train(cfg)
    built = result.output_dir / "base-model-extended"
    report = json.loads((built / REPORT).read_text(encoding="utf-8"))
    validation = result.metrics["data"]["validation"]["documents"]
    assert report["tokens_added"] == 30 and report["heldout_documents"] == validation  # the run's own split
    assert report["documents"] == result.metrics["data"]["train"]["documents"]
    assert len(AutoTokenizer.from_pretrained(result.output_dir)) == len(AutoTokenizer.from_pretrained(built))
    assert json.loads((result.output_dir / "igea_run.json").read_text())["config"]["model"]["extend_vocabulary"]

    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert base_model_path(cfg) == str(built)  # reused, not rebuilt
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp
    changed = make_config(tmp_path, tiny_model_dir, corpus_file, model={"extend_vocabulary": {"num_tokens": 31}})
    assert base_model_path(changed) == str(built)  # other settings: built again, in place
    assert json.loads((built / REPORT).read_text(encoding="utf-8"))["tokens_added"] == 31


def test_run_fits_on_the_documents_its_config_asks_and_rebuilds_when_they_change(tiny_model_dir, corpus_file,
                                                                                  tmp_path):
    def extended(fit_documents: int) -> dict:
        cfg = make_config(tmp_path, tiny_model_dir, corpus_file, model={"extend_vocabulary": {
            "num_tokens": 20, "fit_documents": fit_documents, "device": "cpu"}})
        return json.loads((Path(base_model_path(cfg)) / REPORT).read_text(encoding="utf-8"))

    report = extended(0)
    assert report["fit"]["asked"] == report["fit"]["documents"] == 0 and report["distillation"] is None
    assert report["fit"]["device"] == "cpu"
    report = extended(5)
    assert report["fit"]["documents"] == 5 and report["distillation"]["documents"] <= 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_run_whose_fit_device_is_missing_names_the_config_key(tiny_model_dir, corpus_file, tmp_path, capsys):
    """`model.extend_vocabulary.device: cuda` on a machine without one: one line naming the config's key (not the
    CLI's `device`), before the corpus is read or an extended model is begun."""
    raw = config_dict(tmp_path / "run", tiny_model_dir, corpus_file,
                      model={"extend_vocabulary": {"num_tokens": 20, "device": "cuda"}})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("igea: error: model.extend_vocabulary.device: 'cuda' cannot be used: no CUDA "
                                    "device is available here; choose cpu")
    assert "extending the vocabulary" not in err
    assert not (tmp_path / "run" / "base-model-extended").exists()


def test_tiny_model_is_built_then_extended(corpus_file, tmp_path):
    shape = {"vocab_size": 300, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "intermediate_size": 32}
    raw = config_dict(tmp_path / "run", tmp_path, corpus_file, model={"extend_vocabulary": {"num_tokens": 20}})
    raw["model"] = {"tiny": shape, "extend_vocabulary": {"num_tokens": 20}}
    tokenizer = load_tokenizer(config_from_dict(raw))
    assert len(tokenizer) == 300 + 20 and tokenizer.name_or_path == str(tmp_path / "run" / "base-model-extended")
    assert len(AutoTokenizer.from_pretrained(tmp_path / "run" / "base-model")) == 300


@pytest.mark.parametrize("section, message", [
    ({"num_tokens": 0}, "model.extend_vocabulary.num_tokens: 0 is not allowed"),
    ({}, "model.extend_vocabulary: missing required key 'num_tokens'"),
    ({"num_tokens": 5, "tokens": 1}, "unknown key 'model.extend_vocabulary.tokens'"),
    ({"num_tokens": 5, "corpus": "nowhere/*.txt"}, "model.extend_vocabulary.corpus: no file matches"),
    ({"num_tokens": 5, "fit_documents": -2}, "model.extend_vocabulary.fit_documents: -2 is not allowed; it must be >="),
    ({"num_tokens": 5, "device": "gpu"}, "model.extend_vocabulary.device: 'gpu' is not allowed; choose cpu, cuda"),
])
def test_config_errors(tiny_model_dir, corpus_file, tmp_path, section, message):
    raw = config_dict(tmp_path / "run", tiny_model_dir, corpus_file, model={"extend_vocabulary": section})
    with pytest.raises(igea.ConfigError, match=re.escape(message)):
        config_from_dict(raw)
