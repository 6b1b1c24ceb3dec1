"""A place where forgetting happens: a tiny model pretrained on general text, then continued on the biomedical
sample at a high learning rate, and what replay, merges back towards the base and checkpoint averaging recover.

1. A tiny Mistral (byte-level BPE trained on all the texts) is pretrained on general text: each `--general` set
   (default `igea:general`, Italian, and `igea:general-en`, English, when igea ships it), a tenth of each held out.
   The checkpoint with the lowest general held-out loss is kept (`load_best_model_at_end`): the base.
2. The base is continued on `igea:sample` (a tenth held out) at `--lr`: the run. The same again with a general
   replay source at weight `--replay` (data.sources): the replay run.
3. `igea.merge` scores on the same held-out sets (biomed first, the domain; the general sets after it): the
   base, merges at 0.25/0.5/0.75, the run, its checkpoints and their average; and the replay run with its merges.

One JSON line per model (its loss on each set, the general sets' token-weighted loss, and against the run: the
share of the general loss rise it recovers, and its domain cost), a summary line, and a plot of domain loss
against general loss (`--plot`).

Then the merge itself on a sharded checkpoint: `igea.merge.write_merged` (tensor by tensor, one shard at a time)
against loading both models, interpolating their state dicts and saving (the plain way), each in a process of
its own: seconds and peak resident memory above the process's memory before the merge, against the largest
shard and the model's size.

    python bench/bench_forgetting.py --plot docs/forgetting-tradeoff.png   # both parts
    python bench/bench_forgetting.py --part sharded                       # the sharded merge alone
    python bench/bench_forgetting.py --quick                              # a few steps, small shapes (CI)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import igea
from igea.config import SHIPPED_CORPORA, TinyModelConfig, config_from_dict, shipped_corpus_path
from igea.metrics import combined

GENERAL_SETS = {"general_it": "igea:general", "general_en": "igea:general-en"}
REAL_SHAPE = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
              "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": False}
QUICK_SHAPE = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps and small shapes: a smoke run")
    parser.add_argument("--general", action="append", metavar="NAME=CORPUS",
                        help="a general set (repeatable; default: general_it=igea:general, and "
                             "general_en=igea:general-en when shipped)")
    parser.add_argument("--part", choices=("all", "forgetting", "sharded"), default="all",
                        help="the testbed, the sharded merge's time and memory, or both")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=120, help="continued-pretraining steps on the domain")
    parser.add_argument("--lr", type=float, default=3e-3, help="the continued pretraining's (high) learning rate")
    parser.add_argument("--replay", type=float, default=0.15, help="the replay source's weight")
    parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints kept (and averaged)")
    parser.add_argument("--shard-shape", choices=("real", "quick"), default=None,
                        help="the sharded merge's model: real (hidden 576, 30 layers, vocab 49,152) or quick")
    parser.add_argument("--max-shard-size", default=None, help="shard size of the sharded model (default 100MB)")
    parser.add_argument("--plot", type=Path, help="where the trade-off plot goes")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.steps, args.checkpoints = 12, 4, 2
    args.shard_shape = args.shard_shape or ("quick" if args.quick else "real")
    args.max_shard_size = args.max_shard_size or ("100KB" if args.shard_shape == "quick" else "100MB")
    return args


def general_sets(args: argparse.Namespace) -> dict[str, str]:
    """The general sets by name: those given, else the shipped ones (English only once igea ships it)."""
    if args.general:
        return dict(item.split("=", 1) for item in args.general)
    sets = {name: corpus for name, corpus in GENERAL_SETS.items() if corpus in SHIPPED_CORPORA}
    for name, corpus in GENERAL_SETS.items():
        if name not in sets:
            logging.info("%s is not shipped with this igea: no %s set", corpus, name)
    return sets


def read_lines(corpus: str) -> list[str]:
    path = shipped_corpus_path(corpus) if corpus in SHIPPED_CORPORA else corpus
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def split_files(work: Path, name: str, lines: list[str]) -> tuple[Path, Path]:
    """Every tenth document held out; the rest to train on. Both as text files, one document a line."""
    train, held = work / f"{name}_train.txt", work / f"{name}_heldout.txt"
    train.write_text("\n".join(t for i, t in enumerate(lines) if i % 10 != 5) + "\n", encoding="utf-8")
    held.write_text("\n".join(t for i, t in enumerate(lines) if i % 10 == 5) + "\n", encoding="utf-8")
    return train, held


def run_config(work: Path, name: str, model: Path | str, data: dict[str, Any], training: dict[str, Any]):
    raw = {
        "model": {"name_or_path": str(model)},
        "data": {"block_size": 64, "validation_split": 0, **data},
        "training": {"output_dir": str(work / name), "per_device_train_batch_size": 8,
                     "per_device_eval_batch_size": 16, "use_cpu": not torch.cuda.is_available(),
                     "disable_tqdm": True, "logging_steps": 10 ** 6, "seed": 0, **training},
        "generation": {"prompts": []},
        "eval": {"before_training": False},
    }
    return config_from_dict(raw)


def loss_line(name: str, point: dict[str, Any], general: list[str]) -> dict[str, Any]:
    sets = point["held_out_sets"]
    return {"model": name, **{s: round(m["loss"], 4) for s, m in sets.items()},
            "domain": round(sets["biomed"]["loss"], 4),
            "general": round(combined([sets[s] for s in general])["loss"], 4)}


def forgetting(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    general = general_sets(args)
    held: dict[str, str] = {}
    biomed = read_lines("igea:sample")[:80 if args.quick else None]
    biomed_train, held["biomed"] = map(str, split_files(work, "biomed", biomed))
    general_train = []
    for name, corpus in general.items():
        train, held[name] = map(str, split_files(work, name, read_lines(corpus)))
        general_train.append(train)
    texts = [line for path in [biomed_train, *general_train] for line in read_lines(path)]
    shape = TinyModelConfig(vocab_size=2000 if not args.quick else 500, hidden_size=128 if not args.quick else 32,
                            num_hidden_layers=4 if not args.quick else 2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=256 if not args.quick else 64,
                            max_position_embeddings=256, seed=0)
    random_init = igea.build_tiny_model(texts, shape, work / "random-init")

    every = max(args.pretrain_steps // (4 if args.quick else 20), 1)
    pretrain = run_config(work, "base", random_init, {"path": general_train, "validation_path": held}, {
        "max_steps": args.pretrain_steps, "learning_rate": args.pretrain_lr, "eval_steps": every,
        "save_steps": every, "save_total_limit": 1, "load_best_model_at_end": True,
        "metric_for_best_model": f"eval_{next(iter(general))}_loss", "warmup_ratio": 0.05})
    base = igea.train(pretrain).output_dir

    every = max(args.steps // args.checkpoints, 1)
    continued = {"max_steps": args.steps, "learning_rate": args.lr, "eval_steps": args.steps,
                 "save_steps": every, "save_total_limit": args.checkpoints, "warmup_ratio": 0.02}
    run = igea.train(run_config(work, "run", base, {"path": biomed_train, "validation_path": held}, continued))
    replay_sources = [{"path": biomed_train, "weight": 1 - args.replay, "label": "biomed_train"},
                      {"path": general_train, "weight": args.replay, "label": "replay"}]
    replay = igea.train(run_config(work, "replay", base, {"sources": replay_sources, "validation_path": held},
                                   continued))

    merged = igea.merge(run.output_dir, plot=work / "run-merge.png")
    merged_replay = igea.merge(replay.output_dir, checkpoints=False, plot=work / "replay-merge.png")
    points = {p["name"]: p for p in merged["points"]}
    replay_points = {p["name"]: p for p in merged_replay["points"]}
    general_names = merged["general"]
    lines = [loss_line(p["name"], p, general_names) for p in merged["points"]]
    lines += [loss_line(f"replay {p['name']}", p, general_names) for p in merged_replay["points"]
              if p["kind"] != "base"]
    by_name = {line["model"]: line for line in lines}
    start, end = by_name["base"], by_name["run"]
    rise = end["general"] - start["general"]
    for line in lines:
        line["general_recovered"] = round((end["general"] - line["general"]) / rise, 3) if rise > 0 else None
        line["domain_cost"] = round(line["domain"] - end["domain"], 4)
        print(json.dumps(line))
    scored = [p for p in merged["points"] if "same_as" not in p]  # a checkpoint of the run's weights is not scored
    base_equal = all(points["base"]["held_out_sets"][s]["loss"] == replay_points["base"]["held_out_sets"][s]["loss"]
                     for s in merged["sets"])
    summary = {
        "sets": merged["sets"], "domain": merged["domain"], "general": general_names,
        "held_out_tokens": {s: points["base"]["held_out_sets"][s]["tokens"] for s in merged["sets"]},
        "pretrain_steps": args.pretrain_steps, "pretrain_best": json.loads(
            (Path(base) / "metrics.json").read_text()).get("best"),
        "steps": args.steps, "lr": args.lr, "replay_weight": args.replay, "checkpoints": merged["checkpoints"],
        "general_rise": round(rise, 4), "domain_gain": round(start["domain"] - end["domain"], 4),
        "base_scored_alike_by_both_merges": base_equal,
        "merge_s_per_point": round(sum(p["merge_s"] for p in scored) / len(scored), 3),
        "eval_s_per_point": round(sum(p["eval_s"] for p in scored) / len(scored), 3),
    }
    if args.plot:
        plot(lines, args.plot)
        summary["plot"] = str(args.plot)
    return summary


def plot(lines: list[dict[str, Any]], path: Path) -> None:
    """Domain loss against general loss: the run's merge path, its checkpoints and average, the replay run's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_name = {line["model"]: line for line in lines}
    figure = Figure(figsize=(6.5, 5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for prefix, colour, label in (("", "C1", "merges of the run"), ("replay ", "C2", "merges of the replay run")):
        path_names = ["base"] + [n for n in by_name if n.startswith(f"{prefix}alpha ")] + [f"{prefix}run"]
        xs, ys = [by_name[n]["domain"] for n in path_names], [by_name[n]["general"] for n in path_names]
        ax.plot(xs, ys, "o-" if not prefix else "o--", color=colour, label=label, zorder=1)
        for n in path_names[1:-1]:
            ax.annotate(n.removeprefix(prefix).removeprefix("alpha "), (by_name[n]["domain"], by_name[n]["general"]),
                        textcoords="offset points", xytext=(5, 4), fontsize="small")
    marks = [("base", "s", "C0", "base (pretrained on general text)"), ("run", "*", "C3", "run"),
             ("replay run", "P", "C2", "run with replay"), ("average", "D", "C4", "checkpoint average")]
    for name, marker, colour, label in marks:
        if name in by_name:
            ax.scatter(by_name[name]["domain"], by_name[name]["general"], marker=marker, s=150, color=colour,
                       label=label, zorder=3)
    checkpoints = [n for n in by_name if n.startswith("checkpoint-")]
    ax.scatter([by_name[n]["domain"] for n in checkpoints], [by_name[n]["general"] for n in checkpoints],
               marker="^", color="0.5", label="checkpoints of the run", zorder=2)
    for n in checkpoints:
        ax.annotate(f"step {n.removeprefix('checkpoint-')}", (by_name[n]["domain"], by_name[n]["general"]),
                    textcoords="offset points", xytext=(5, -11), fontsize="small", color="0.4")
    ax.set_xlabel("domain loss (biomed held-out)")
    ax.set_ylabel("general loss (general held-out)")
    ax.set_title("Forgetting testbed: what replay, merges and averaging recover", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


MEASURE = textwrap.dedent("""
    import json, sys, time
    import torch, yaml, safetensors.torch, transformers, igea.report
    from transformers import AutoModelForCausalLM
    from igea.merge import write_merged

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    how, run, base, out, shard = sys.argv[1:]
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    before = status("VmRSS:")
    start = time.perf_counter()
    if how == "igea":
        write_merged(run, out, 0.5, base=base)
    else:  # the plain way: both models in memory, their state dicts interpolated, the result saved
        merged = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
        other = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
        with torch.no_grad():
            for name, tensor in merged.state_dict().items():
                tensor.mul_(0.5).add_(other[name], alpha=0.5)
        del other
        merged.save_pretrained(out, max_shard_size=shard)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_growth": status("VmHWM:") - before, "rss_before": before}))
""")


def sharded_merge(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """igea's merge against the plain way on a sharded checkpoint: time and peak memory above the start."""
    from transformers import MistralConfig, MistralForCausalLM

    shape = REAL_SHAPE if args.shard_shape == "real" else QUICK_SHAPE
    for name, seed in (("shard-base", 0), ("shard-run", 1)):
        torch.manual_seed(seed)
        MistralForCausalLM(MistralConfig(**shape)).save_pretrained(work / name, max_shard_size=args.max_shard_size)
    files = sorted((work / "shard-run").glob("*.safetensors"))
    largest, total = max(f.stat().st_size for f in files), sum(f.stat().st_size for f in files)
    result: dict[str, Any] = {"shape": args.shard_shape, "shards": len(files),
                              "largest_shard_mb": round(largest / 1e6, 1), "model_mb": round(total / 1e6, 1)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(igea.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    for how in ("igea", "plain"):
        done = subprocess.run([sys.executable, "-c", MEASURE, how, str(work / "shard-run"), str(work / "shard-base"),
                               str(work / f"shard-{how}"), args.max_shard_size], capture_output=True, text=True,
                              env=env, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        result[f"{how}_s"] = round(measured["seconds"], 2)
        result[f"{how}_peak_growth_mb"] = round(measured["peak_growth"] / 1e6, 1)
        result[f"{how}_peak_over_largest_shard"] = round(measured["peak_growth"] / largest, 2)
    merged = {}
    for how in ("igea", "plain"):  # both wrote the same merge (the plain way's float32 sums in another order)
        merged[how] = {k: v for f in sorted((work / f"shard-{how}").glob("*.safetensors")) for k, v in
                       load_file(str(f)).items()}
    result["same_weights"] = merged["igea"].keys() == merged["plain"].keys() and all(
        torch.allclose(merged["igea"][k], merged["plain"][k], atol=1e-6) for k in merged["igea"])
    result["igea_shards_kept"] = sorted(f.name for f in (work / "shard-igea").glob("*.safetensors")) == [
        f.name for f in files]
    result["time_ratio_plain_over_igea"] = round(result["plain_s"] / result["igea_s"], 2)
    return result


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if args.part in ("all", "forgetting"):
            print(json.dumps({"summary": forgetting(args, work)}))
        if args.part in ("all", "sharded"):
            print(json.dumps({"sharded_merge": sharded_merge(args, work)}))


if __name__ == "__main__":
    main()
