"""Domain vocabulary: a general Italian tokenizer extended on biomedical abstracts, before and after training.

Minerva's situation, scaled down. Minerva's tokenizer was trained on general Italian (and English) web text;
the corpus to adapt to is biomedical Italian. Here:

- the general tokenizer is a SentencePiece-style BPE (Metaspace '▁', byte fallback, as Mistral/Minerva)
  trained on general Italian word frequencies: `wordfreq`'s Italian list (Wikipedia, subtitles, news, books,
  web), each word weighted by its frequency, 15% of it capitalised. No biomedical text goes into it;
- the base model is a small Mistral with that tokenizer, pretrained on 396 abstracts (`dev` and the first
  half of `train`), so that its embeddings of the general pieces mean something before the vocabulary grows;
- the adaptation corpus is the other half of `train` (297 abstracts): `model.extend_vocabulary` learns the
  new tokens on it, and the base model is trained on it twice, with the base and with the extended
  vocabulary: same documents, epochs, batch of blocks, learning rate and schedule (so the extended run
  takes fewer steps);
- everything is scored on the 100 `test` abstracts: fertility (tokens per word), and bits per byte (total
  NLL / UTF-8 bytes: comparable across tokenizers, unlike per-token loss) untrained and at a checkpoint every
  10% of each run, to find where the extended model breaks even with its base (`--tied`: the same with tied
  input and output embeddings).

Also measured: on the untrained extended model, other initialisations of the new rows (igea's fit without
its distillation; plain mean of the pieces; output rows from the first piece; transformers'
`resize_token_embeddings` default);
`tokenizer.add_tokens` with the same number of whole words (with and without their leading space) instead of
new BPE merges; and the fertility change with general tokenizers of other sizes (Minerva's is 32768),
tokenizers only.

    python bench/bench_vocab.py           # vocab 8192, 1,000 new tokens, hidden 128, 2 layers (about 12 min)
    python bench/bench_vocab.py --tied --scan-vocab-sizes ''   # the same, tied embeddings
    python bench/bench_vocab.py --quick   # a minute, for CI: the same steps, tiny sizes
    python bench/bench_vocab.py --curve-only --documents-curve 0,10,25,50,100,250,1000   # the penalty against
                                          # the documents the fit and the distillation read (--tied: tied)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

import igea
from igea.config import config_from_dict
from igea.modeling import SPECIAL_TOKENS
from igea.newrows import FIT_DOCUMENTS, piece_weights, read_with_base, resize_and_initialise
from igea.vocab import REPORT, fertility, learn_merges, save_extended_tokenizer, word_counts

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ncbi-disease-it"


def read_split(data: Path, split: str, limit: int | None = None) -> list[str]:
    lines = (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    return texts[:limit] if limit else texts


def general_tokenizer(vocab_size: int, words: int) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE trained on `words` occurrences of Italian words drawn by wordfreq's frequencies."""
    import wordfreq

    def corpus():
        for word, share in wordfreq.get_frequency_dict("it", "large").items():
            count = round(share * words)
            if count < 1:
                return
            capitalised = round(count * 0.15) if word[:1].islower() else 0
            yield " ".join([word] * (count - capitalised))
            if capitalised:
                yield " ".join([word[:1].upper() + word[1:]] * capitalised)

    core = Tokenizer(models.BPE(byte_fallback=True, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS.values(), *byte_tokens],
                                  show_progress=False)
    core.train_from_iterator(corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.model_max_length = 1_000_000
    return tokenizer


def random_model(tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace, out_dir: Path) -> Path:
    """A randomly initialised Mistral of the asked shape with `tokenizer`, saved as a model directory."""
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.block_size * 4, sliding_window=None, tie_word_embeddings=args.tied,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def train_run(name: str, model_dir: Path, corpus: Path, epochs: float, lr: float, args: argparse.Namespace,
              work: Path, save_every: float | None = None, **model: Any) -> tuple[Path, dict[str, Any]]:
    """`igea train` on `corpus` (no validation split) from `model_dir`; the run directory and its metrics.

    `save_every` (a fraction of the run) keeps a checkpoint that often, to score the model along training."""
    saving = ({"save_strategy": "steps", "save_steps": save_every, "save_total_limit": 1000} if save_every
              else {"save_strategy": "no"})
    cfg = config_from_dict({
        "model": {"name_or_path": str(model_dir), **model},
        "data": {"path": str(corpus), "block_size": args.block_size, "validation_split": 0,
                 "cache_dir": str(work / "cache")},
        "training": {
            "output_dir": str(work / name), "learning_rate": lr, "num_train_epochs": epochs,
            "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
            "warmup_ratio": 0.05, "lr_scheduler_type": "cosine", "weight_decay": 0.0, "seed": 42,
            **saving, "logging_steps": 10_000, "use_cpu": True, "disable_tqdm": True,
        },
    })
    print(f"training {name}: {epochs:g} epochs on {corpus.name}", flush=True)
    start = time.perf_counter()
    result = igea.train(cfg)
    seconds = time.perf_counter() - start
    data = result.metrics["data"]["train"]
    stats = {"train_tokens": data["tokens"], "train_blocks": data["blocks"], "epochs": epochs,
             "steps": result.log_history[-1]["step"], "train_loss": result.metrics["train"]["train_loss"],
             "seconds": round(seconds, 1)}
    return result.output_dir, stats


def score(path: Path, texts: list[str], tokenizer_dir: Path | None = None) -> float:
    """Bits per byte of the model in `path` on `texts`."""
    model = AutoModelForCausalLM.from_pretrained(path)
    return igea.bits_per_byte(model, AutoTokenizer.from_pretrained(tokenizer_dir or path), texts)


def curve(run_dir: Path, untrained: float, stats: dict[str, Any], texts: list[str]) -> list[dict[str, Any]]:
    """Bits per byte on `texts` at the start and at each checkpoint of a run: step, epochs and tokens trained."""
    points = [{"step": 0, "epochs": 0.0, "tokens": 0, "bpb": untrained}]
    for folder in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(folder.name.split("-")[1])
        points.append({"step": step, "epochs": stats["epochs"] * step / stats["steps"],
                       "tokens": round(stats["train_tokens"] * stats["epochs"] * step / stats["steps"]),
                       "bpb": score(folder, texts, run_dir)})
    return points


def break_even(base: list[dict[str, Any]], extended: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first point of `extended` at or below the base run's bits per byte after the same text (epochs,
    the base curve interpolated linearly); None when the extended run never gets there."""
    for point in extended:
        after = [p for p in base if p["epochs"] >= point["epochs"]]
        before = [p for p in base if p["epochs"] <= point["epochs"]]
        if not after or not before:
            continue
        low, high = before[-1], after[0]
        share = (point["epochs"] - low["epochs"]) / (high["epochs"] - low["epochs"]) if high is not low else 0.0
        reference = low["bpb"] + share * (high["bpb"] - low["bpb"])
        if point["bpb"] <= reference:
            return {**point, "base_bpb": reference}
    return None


# ----------------------------------------------------------------------------------------------------------
# Other ways to add tokens, measured on the same budget


@torch.no_grad()
def other_inits(base_dir: Path, extended_dir: Path, texts: list[str], corpus: list[str]) -> dict[str, float]:
    """Bits per byte of the untrained extended model with other initialisations of the new rows: igea's
    without its distillation (rows fitted to the chain of pieces on `corpus`), and means (tied embeddings:
    one row for both, so only the plain mean)."""
    tokenizer = AutoTokenizer.from_pretrained(extended_dir)
    report = json.loads((extended_dir / REPORT).read_text(encoding="utf-8"))
    base = AutoTokenizer.from_pretrained(base_dir)
    new_ids = [t["id"] for t in report["new_tokens"]]
    pieces = [base.convert_tokens_to_ids(t["pieces"]) for t in report["new_tokens"]]
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    reading = read_with_base(model, base, tokenizer, corpus[:FIT_DOCUMENTS], dict(zip(new_ids, pieces, strict=True)))
    resize_and_initialise(model, new_ids, pieces, reading.contexts)
    results = {"fitted_not_distilled": igea.bits_per_byte(model, tokenizer, texts)}
    variants = {
        "mean_of_pieces": (lambda rows: rows.mean(dim=0), lambda rows: rows.mean(dim=0)),
        "weighted_means_unfitted": (lambda rows: piece_weights(len(rows), later=True) @ rows,
                                    lambda rows: piece_weights(len(rows), later=False) @ rows),
        "input_mean_output_first_piece": (lambda rows: rows.mean(dim=0), lambda rows: rows[0]),
    }
    for name, (input_row, output_row) in variants.items():
        model = AutoModelForCausalLM.from_pretrained(extended_dir)
        inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        tied = inputs.data_ptr() == outputs.data_ptr()
        if tied and name != "mean_of_pieces":
            continue
        for token in report["new_tokens"]:
            ids = base.convert_tokens_to_ids(token["pieces"])
            inputs[token["id"]] = input_row(inputs[ids])
            if not tied:
                outputs[token["id"]] = output_row(outputs[ids])
        results[name] = igea.bits_per_byte(model, tokenizer, texts)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tokenizer))  # transformers' default: drawn around the mean embedding
    results["transformers_resize_default"] = igea.bits_per_byte(model, tokenizer, texts)
    return results


@torch.no_grad()
def plain_mean(base_dir: Path, extended_dir: Path, texts: list[str]) -> float:
    """Bits per byte on `texts` of the extended model with each new row the plain mean of its pieces' rows."""
    report = json.loads((extended_dir / REPORT).read_text(encoding="utf-8"))
    base, tokenizer = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(extended_dir)
    model = AutoModelForCausalLM.from_pretrained(extended_dir)
    for matrix in {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                   }.values():
        for token in report["new_tokens"]:
            matrix[token["id"]] = matrix[base.convert_tokens_to_ids(token["pieces"])].mean(dim=0)
    return igea.bits_per_byte(model, tokenizer, texts)


def documents_curve(base_dir: Path, adapt: list[str], test: list[str], counts: list[int], num_tokens: int,
                    work: Path) -> dict[str, Any]:
    """The untrained penalty in bits per byte on `test` (extended over base) when the new rows are fitted and
    distilled on the first N adaptation documents, for each N of `counts` (0: the start rows), and the time the
    extension took; with the plain mean's penalty to compare."""
    base = score(base_dir, test)
    points = []
    for count in counts:
        out = work / f"curve-{count}"
        start = time.perf_counter()
        report = igea.extend_vocabulary(str(base_dir), adapt, num_tokens, out, heldout_texts=test,
                                        fit_documents=count)
        seconds = time.perf_counter() - start
        bpb = score(out, test)
        points.append({"fit_documents": count, "documents_read": report["fit"]["documents_read"],
                       "fitted_tokens": report["fitted_tokens"], "seconds": round(seconds, 1), "bpb": bpb,
                       "penalty": bpb / base - 1})
        print(f"fit documents {count} ({report['fit']['documents_read']} read): {bpb:.4f} bits per byte, "
              f"penalty {bpb / base - 1:+.2%}, {seconds:.0f} s", flush=True)
    mean = plain_mean(base_dir, work / f"curve-{counts[0]}", test)
    return {"base": base, "points": points, "plain_mean": mean, "plain_mean_penalty": mean / base - 1}


def add_tokens_variants(base_dir: Path, corpus: list[str], test: list[str], num_tokens: int) -> dict[str, Any]:
    """`tokenizer.add_tokens` with the `num_tokens` whole words that save the most tokens in `corpus`.

    `plain`: the words as they are (what users usually do); `leading_space`: each word with the space before
    it, as it occurs in running text. Reported: fertility on `test`, how many `test` documents still decode
    to themselves, and how many added tokens the encoding of `test` starts inside a word (right after a letter
    or digit: `cardio` in `elettrocardiogramma`).
    """
    base = AutoTokenizer.from_pretrained(base_dir)
    counts = word_counts(base, corpus)
    backend = base.backend_tokenizer
    saving = Counter({w: c * (len(backend.model.tokenize(w)) - 1) for w, c in counts.items()})
    words = [w.removeprefix("\u2581") for w, _ in saving.most_common() if w.startswith("\u2581")][:num_tokens]
    results: dict[str, Any] = {"words": len(words)}
    for name, form in (("plain", "{}"), ("leading_space", " {}")):
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        tokenizer.add_tokens([AddedToken(form.format(w), normalized=False) for w in words])
        exact, inside = 0, 0
        for text in test:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            exact += tokenizer.decode(encoded["input_ids"]) == text
            starts = [start + text[start:end].startswith(" ")
                      for i, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
                      if i >= len(base)]
            inside += sum(start > 0 and text[start - 1].isalnum() for start in starts)
        results[name] = {"fertility": fertility(tokenizer, test), "roundtrip_documents": exact,
                         "starting_inside_words": inside}
    return results


def fertility_by_vocab_size(sizes: list[int], args: argparse.Namespace, adapt: list[str],
                            test: list[str]) -> dict[int, dict[str, float]]:
    """Fertility on `test` of general tokenizers of other sizes, before and after `igea vocab`'s merges."""
    results = {}
    for size in sizes:
        tokenizer = general_tokenizer(size, args.general_words)
        merges = learn_merges(tokenizer, adapt, args.num_tokens)
        with tempfile.TemporaryDirectory() as scratch:
            save_extended_tokenizer(tokenizer, merges, list(dict.fromkeys(m.token for m in merges)), Path(scratch))
            before, after = fertility(tokenizer, test), fertility(AutoTokenizer.from_pretrained(scratch), test)
        results[size] = {"before": before, "after": after, "change": after / before - 1}
        print(f"vocab {size}: fertility {before:.3f} -> {after:.3f} ({after / before - 1:+.1%})", flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="folder with train/dev/test.jsonl (`text`)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="the general tokenizer's vocabulary")
    parser.add_argument("--general-words", type=int, default=20_000_000,
                        help="word occurrences the general tokenizer is trained on")
    parser.add_argument("--num-tokens", type=int, default=1000, help="tokens to add")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pretrain-epochs", type=float, default=4, help="epochs of the base model's pretraining")
    parser.add_argument("--epochs", type=float, default=2, help="epochs of continued pretraining, both runs")
    parser.add_argument("--scan-vocab-sizes", default="16384,32768",
                        help="general tokenizer sizes whose fertility change is measured too ('' for none)")
    parser.add_argument("--limit", type=int, help="use only the first N documents of each split")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (torch.set_num_threads)")
    parser.add_argument("--tied", action="store_true", help="tied input/output embeddings (as most small models)")
    parser.add_argument("--documents-curve", default="",
                        help="comma-separated values of fit_documents: the untrained penalty after extending the "
                             "pretrained base model with each (e.g. 0,10,25,50,100,250,1000)")
    parser.add_argument("--curve-only", action="store_true",
                        help="pretrain the base model and measure --documents-curve, nothing else")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a fraction of an epoch (for CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab_size, args.general_words, args.num_tokens = 1024, 300_000, 100
        args.hidden_size, args.layers, args.block_size, args.batch_size = 32, 1, 64, 8
        args.pretrain_epochs, args.epochs, args.limit, args.scan_vocab_sizes = 1, 1, 60, ""
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    test = read_split(args.data, "test", args.limit)
    train = read_split(args.data, "train", args.limit)
    half = len(train) // 2
    pretrain_texts, adapt = read_split(args.data, "dev", args.limit) + train[:half], train[half:]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for name, texts in (("pretrain", pretrain_texts), ("adapt", adapt)):
            (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), "utf-8")
        start = time.perf_counter()
        tokenizer = general_tokenizer(args.vocab_size, args.general_words)
        print(f"general tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - start:.0f} s", flush=True)
        base_dir, pretrain = train_run("pretrained", random_model(tokenizer, args, work / "random"),
                                       work / "pretrain.jsonl", args.pretrain_epochs, 2e-3, args, work)
        print(f"base model: {pretrain}", flush=True)
        counts = [int(x) for x in args.documents_curve.split(",") if x.strip()]
        curve_result = documents_curve(base_dir, adapt, test, counts, args.num_tokens, work) if counts else None
        if args.curve_only:
            result = {"benchmark": "vocab_documents_curve", "tied": args.tied, "num_tokens": args.num_tokens,
                      "adapt_documents": len(adapt), "threads": args.threads, "documents_curve": curve_result}
            print(json.dumps(result, ensure_ascii=False))
            return result

        extend = {"extend_vocabulary": {"num_tokens": args.num_tokens}}
        runs = {"base": train_run("base", base_dir, work / "adapt.jsonl", args.epochs, 1e-3, args, work, 0.1),
                "extended": train_run("extended", base_dir, work / "adapt.jsonl", args.epochs, 1e-3, args, work, 0.1,
                                      **extend)}
        extended_dir = work / "extended" / "base-model-extended"
        report = json.loads((extended_dir / REPORT).read_text(encoding="utf-8"))
        fertility_base = fertility(AutoTokenizer.from_pretrained(base_dir), test)
        fertility_ext = fertility(AutoTokenizer.from_pretrained(extended_dir), test)
        untrained = {"base": score(base_dir, test), "extended": score(extended_dir, test),
                     **other_inits(base_dir, extended_dir, test, adapt)}
        trained = {name: score(run_dir, test) for name, (run_dir, _) in runs.items()}
        curves = {name: curve(run_dir, untrained[name], stats, test) for name, (run_dir, stats) in runs.items()}
        even = break_even(curves["base"], curves["extended"])
        variants = add_tokens_variants(base_dir, adapt, test, args.num_tokens)
    sizes = [int(x) for x in args.scan_vocab_sizes.split(",") if x.strip()]
    scan = fertility_by_vocab_size(sizes, args, adapt, test)

    stats = {name: s for name, (_, s) in runs.items()}
    result = {
        "benchmark": "vocab", "vocab_size": len(tokenizer), "num_tokens": args.num_tokens,
        "tokens_added": report["tokens_added"], "threads": args.threads,
        "model": {"hidden_size": args.hidden_size, "layers": args.layers, "block_size": args.block_size,
                  "batch_size": args.batch_size},
        "fertility_base": fertility_base, "fertility_extended": fertility_ext,
        "fertility_change": fertility_ext / fertility_base - 1,
        "train_tokens_change": stats["extended"]["train_tokens"] / stats["base"]["train_tokens"] - 1,
        "bpb_untrained": untrained, "bpb_trained": trained,
        "bpb_trained_change": trained["extended"] / trained["base"] - 1,
        "tied": args.tied, "bpb_untrained_penalty": untrained["extended"] / untrained["base"] - 1,
        "bpb_untrained_penalty_plain_mean": untrained["mean_of_pieces"] / untrained["base"] - 1,
        "curves": curves, "break_even": even,
        "runs": stats, "pretrain": pretrain, "add_tokens": variants, "fertility_by_vocab_size": scan,
        "first_new_tokens": [t["token"] for t in report["new_tokens"][:12]],  # '▁' marks a word start
        "documents_curve": curve_result,
    }
    print(f"fertility on test: {fertility_base:.3f} -> {fertility_ext:.3f} tokens/word "
          f"({result['fertility_change']:+.1%}); training tokens {result['train_tokens_change']:+.1%}")
    print("bits per byte on test, untrained: " + ", ".join(f"{k} {v:.4f}" for k, v in untrained.items()))
    print(f"bits per byte on test after {args.epochs:g} epochs: base {trained['base']:.4f}, extended "
          f"{trained['extended']:.4f} ({result['bpb_trained_change']:+.2%})")
    print(f"untrained penalty: {result['bpb_untrained_penalty']:+.1%} (plain mean: "
          f"{result['bpb_untrained_penalty_plain_mean']:+.1%})")
    for name, points in curves.items():
        print(f"{name} along training: " + ", ".join(f"{p['epochs']:.2f} ep {p['bpb']:.4f}" for p in points))
    print("break-even: " + (f"after {even['epochs']:.2f} epochs ({even['tokens']:,} tokens of the extended run): "
                            f"{even['bpb']:.4f} vs the base run's {even['base_bpb']:.4f}" if even else "not reached"))
    print(f"add_tokens with {variants['words']} whole words: {variants}")
    print(json.dumps(result, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
