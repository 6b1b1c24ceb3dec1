"""The `igea` command: train, prepare, generate, ... Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import igea
from igea.errors import IgeaError, one_line
from igea.logs import route_warnings

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141
"""What a shell command killed by SIGPIPE exits with (128 + 13)."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(resume_flag_last(sys.argv[1:] if argv is None else argv))
    if extra:  # overrides may come after the flags: `igea train c.yaml --resume training.max_steps=10`
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    setup_logging(args.debug)
    try:
        return args.handler(args) or 0
    except IgeaError as err:
        return fail(one_line(str(err)), err.exit_code, args.debug)
    except BrokenPipeError:  # `igea status RUN | head -1`: the reader left; end quietly, as a shell command does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit either
        return EXIT_BROKEN_PIPE
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRORS:
            raise
        return fail(describe_os_error(err), EXIT_USAGE, args.debug)
    except KeyboardInterrupt as err:
        if os.environ.get("RANK", "0") == "0":
            hint = getattr(err, "hint", "")
            print(f"igea: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a command; `hint` says what to run next."""

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint


ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
"""OS errors a user fixes outside igea (disk full, read-only file system, permissions): one line, exit 2."""


def fail(message: str, code: int, debug: bool) -> int:
    """Print one error line (after the traceback with --debug) and return the exit code. In a multi-process
    launch only the first process prints it: every process ends with the same error."""
    if debug:
        traceback.print_exc()
    if os.environ.get("RANK", "0") == "0":
        print(f"igea: error: {message}", file=sys.stderr)
    return code


def describe_os_error(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    hint = " (free some space, then continue with --resume)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return one_line(f"{err.strerror or err}{where}{hint}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igea", description="Continued pretraining of small causal LMs.")
    parser.add_argument("--version", action="version", version=f"igea {igea.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add in (add_init, add_train, add_prepare, add_status, add_generate, add_card, add_eval, add_merge,
                add_vocab):
        add(commands)
    return parser


def setup_logging(debug: bool) -> None:
    """Log lines `HH:MM:SS module: message` on stderr, the libraries' Python warnings among them (igea.logs); the
    main process logs INFO, the others WARNING (all DEBUG with --debug)."""
    if not sys.stderr.isatty():  # a log file, not a terminal: no progress bars redrawn line after line
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # the other processes of a multi-process launch say only what goes wrong (as the Trainer's log_level_replica):
    # the main process's lines are the run's, and each would otherwise come once per process
    main_process = os.environ.get("RANK", "0") == "0"
    level = logging.DEBUG if debug else logging.INFO if main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not debug:
        for noisy in ("httpx", "urllib3", "filelock", "fsspec", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    route_warnings()


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.block_size=512")


def _command(commands, name: str, handler: Callable, help: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=handler)
    return parser


# ----------------------------------------------------------------------------------------------------------
# igea init


def add_init(commands) -> None:
    parser = _command(commands, "init", cmd_init, "print a commented starter config (a preset shipped with igea)")
    parser.add_argument("--preset", default="demo", choices=preset_names(),
                        help="demo: a tiny model on the sample corpus, runs on a laptop; igea-*: the card's recipes")
    parser.add_argument("--output", metavar="FILE", help="write the config here instead of printing it")


def preset_names() -> list[str]:
    from igea.config import PRESETS_DIR

    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def cmd_init(args: argparse.Namespace) -> int:
    from igea.config import preset

    text = preset(args.preset).read_text(encoding="utf-8")
    if not args.output:
        print(text, end="")
        return 0
    target = Path(args.output)
    if target.exists():
        raise IgeaError(f"--output: '{target}' exists; igea init does not replace files")
    if not target.parent.is_dir():
        raise IgeaError(f"--output: directory '{target.parent}' does not exist")
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}: edit it, then `igea train {target}`", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------------------
# igea train / igea prepare


def add_train(commands) -> None:
    parser = _command(commands, "train", cmd_train, "continue pretraining as the config says, then sample text")
    _config_arguments(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=False, type=resume_value, metavar="auto",
                        help="continue the run in output_dir from its last complete checkpoint (a directory with no "
                             "run is an error); --resume=auto: continue it if there is one, else start it")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: continue even though training settings changed (both are recorded)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the igea run in output_dir (only files igea wrote are removed)")


def resume_value(text: str) -> str:
    """The value `--resume=VALUE` may take: `auto`."""
    from igea.rundir import RESUME_AUTO

    if text != RESUME_AUTO:
        raise argparse.ArgumentTypeError(f"expected --resume or --resume={RESUME_AUTO}, got --resume={text}")
    return text


def resume_flag_last(argv: list[str]) -> list[str]:
    """`igea train` arguments with a bare `--resume` moved to the end, so that it cannot take the config or an
    override that follows it for its optional value (`--resume training.max_steps=10`); `--resume auto` becomes
    `--resume=auto`."""
    if "train" not in argv or "--resume" not in argv:
        return list(argv)
    out, bare, i = [], False, 0
    while i < len(argv):
        if argv[i] != "--resume":
            out.append(argv[i])
        elif argv[i + 1:i + 2] == ["auto"]:
            out.append("--resume=auto")
            i += 1
        else:
            bare = True
        i += 1
    return out + (["--resume"] if bare else [])


def cmd_train(args: argparse.Namespace) -> int:
    cfg = igea.load_config(args.config, args.overrides)
    if args.allow_config_change and not args.resume:
        raise IgeaError("--allow-config-change goes with --resume")
    try:
        result = igea.run(cfg, resume=args.resume, overwrite=args.overwrite,
                          allow_config_change=args.allow_config_change)
    except KeyboardInterrupt:
        raise Interrupted(after_interrupt(args, cfg.output_dir)) from None
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    from igea.report import held_out_summary

    print(f"\nrun saved in {result.output_dir}")
    if summary := held_out_summary(result.metrics):
        print(summary)
    for prompt, text in result.metrics.get("samples", {}).items():
        print(f"\nsample for {prompt!r}:\n{text}")
    return 0



def after_interrupt(args: argparse.Namespace, output_dir: Path) -> str:
    """What to run after Ctrl-C stopped `igea train`: the same command with --resume when a checkpoint is saved,
    the same command again when none is."""
    from igea.rundir import RUN_MARKER, complete_checkpoints

    command = ["igea", "train", args.config, *args.overrides]
    if (output_dir / RUN_MARKER).is_file():
        return f"the run had finished; `igea card {shlex.quote(str(output_dir))}` writes its card again"
    saved = complete_checkpoints(output_dir) if output_dir.is_dir() else []
    if not saved:
        return f"no checkpoint was saved yet, nothing to resume; start again with: {shlex.join(command)}"
    command += ["--resume"] + (["--allow-config-change"] if args.allow_config_change else [])
    return f"{saved[-1].name} is saved; continue with: {shlex.join(command)}"


def add_prepare(commands) -> None:
    parser = _command(commands, "prepare", cmd_prepare, "load, clean, tokenize and pack the corpus (cached)")
    _config_arguments(parser)


def cmd_prepare(args: argparse.Namespace) -> int:
    from igea.arguments import training_arguments
    from igea.train import report_mixture

    cfg = igea.load_config(args.config, args.overrides)
    training = training_arguments(cfg)  # the run's length: what a mixture gives it, as `igea train` says it
    data = igea.prepare_dataset(cfg)
    report_mixture(cfg, data, training)
    print(json.dumps(data.stats, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------------------
# igea status


def add_status(commands) -> None:
    parser = _command(commands, "status", cmd_status,
                      "what a run is doing or did (running, finished, interrupted, failed), from any shell")
    parser.add_argument("run_dir", help="the run's output directory")
    parser.add_argument("--json", action="store_true", help="print the status as one JSON object")


def cmd_status(args: argparse.Namespace) -> int:
    from igea.status import format_status, run_status

    status = run_status(args.run_dir)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


# ----------------------------------------------------------------------------------------------------------
# igea generate


def add_generate(commands) -> None:
    parser = _command(commands, "generate", cmd_generate, "generate text from a run directory or any causal LM")
    parser.add_argument("path", help="run directory, model directory or hub id")
    parser.add_argument("prompts", nargs="*", help="prompts (or --file, or lines on stdin)")
    parser.add_argument("--file", help="read prompts from a file, one a line ('-' for stdin)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--num-return-sequences", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--full-text", action="store_true", help="print prompt + continuation")
    parser.add_argument("--stream", action="store_true", help="print text as it is produced")
    parser.add_argument("--jsonl", action="store_true",
                        help="one JSON object a line: prompt, completion, tokens, seconds (of its batch)")
    parser.add_argument("--truncate-left", action="store_true",
                        help="drop the oldest prompt tokens that do not fit the model's context")
    parser.add_argument("--batch-size", type=int, help="prompts generated together (default 16)")
    parser.add_argument("--device")
    parser.add_argument("--dtype")


def cmd_generate(args: argparse.Namespace) -> int:
    """`igea generate`: continue prompts from arguments, a file or stdin; as text, streamed or JSON lines."""
    from igea.config import GenerationConfig
    from igea.errors import ConfigError
    from igea.generate import (
        DEFAULT_BATCH_SIZE,
        PARAMETERS,
        Generator,
        check_streamable,
        run_generation_config,
        with_overrides,
    )

    if args.stream and args.jsonl:
        raise ConfigError("--stream and --jsonl cannot be combined; choose one")
    prompts = read_prompts(args.prompts, args.file)
    overrides = {name: getattr(args, name) for name in PARAMETERS if getattr(args, name, None) is not None}
    settings = with_overrides(run_generation_config(args.path) or GenerationConfig(), **overrides)
    if args.stream:
        check_streamable(settings)  # bad values fail before the model loads
    generator = Generator.from_pretrained(args.path, device=args.device, dtype=args.dtype, config=settings)
    if args.stream:
        for prompt in prompts:
            if args.full_text:
                print(prompt, end="", flush=True)
            for piece in generator.stream(prompt, truncate_left=args.truncate_left):
                print(piece, end="", flush=True)
            print()
        return 0
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    for c in generator.complete(prompts, truncate_left=args.truncate_left, batch_size=batch_size):
        text = c.prompt + c.text if args.full_text else c.text
        if args.jsonl:
            record = {"prompt": c.prompt, "completion": text, "tokens": c.tokens, "seconds": c.seconds}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(text)
    return 0


def read_prompts(arguments: list[str], file: str | None) -> list[str]:
    """The prompt arguments, then the lines of `file` ('-' is stdin); stdin alone when nothing else is given
    and it is not a terminal. Blank lines are skipped; trailing spaces kept ('Il fegato è ' asks for the next
    word)."""
    prompts = list(arguments)
    text = None
    if file == "-" or (file is None and not prompts and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise IgeaError(f"--file: '{file}' does not exist") from None
        except IsADirectoryError:
            raise IgeaError(f"--file: '{file}' is a directory; give a text file, one prompt a line") from None
        except UnicodeDecodeError:
            raise IgeaError(f"--file: '{file}' is not UTF-8 text") from None
    if text is not None:
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise IgeaError("generate: no prompts; give them as arguments, with --file FILE, or on stdin")
    return prompts


# ----------------------------------------------------------------------------------------------------------
# igea card


def add_card(commands) -> None:
    parser = _command(commands, "card", cmd_card, "write the model card and curves.png of a finished run")
    parser.add_argument("run_dir", help="output directory of a finished run")
    parser.add_argument("--eval", nargs="+", metavar="JSON", type=Path,
                        help="results of `igea eval RUN --tasks ... --output JSON`: their benchmark scores join the "
                             "card's evaluation table (and the run's metrics.json, so later cards keep them)")


def cmd_card(args: argparse.Namespace) -> int:
    from igea.report import write_report

    print(write_report(Path(args.run_dir), args.eval))
    return 0


# ----------------------------------------------------------------------------------------------------------
# igea eval


def add_eval(commands) -> None:
    parser = _command(commands, "eval", cmd_eval,
                      "held-out loss, perplexity and accuracy, and multiple-choice benchmarks, of a model")
    parser.add_argument("path", help="run directory, model directory or hub id")
    parser.add_argument("--corpus", nargs="+", action="append", metavar="[NAME=]FILE",
                        help="held-out text: files, globs, directories or a hub dataset id; NAME=FILES names a "
                             "held-out set evaluated on its own (--corpus biomed=a.txt --corpus general=b.txt)")
    parser.add_argument("--tasks", help="comma-separated: medmcqa_ita, hellaswag_it, arc_it, mmlu_it, "
                                        ".yaml task files or .jsonl/.csv/.parquet question files")
    parser.add_argument("--compare", metavar="BASE", help="evaluate BASE too, on the same data")
    parser.add_argument("--num-fewshot", type=int, help="examples before each question (default: the task's)")
    parser.add_argument("--limit", type=int, help="score only the first N questions of each task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, help="held-out block length (default: the run's)")
    parser.add_argument("--output", metavar="JSON", help="write results and per-question predictions here")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="prepare the held-out blocks in DIR/igea-blocks (default: the datasets cache, "
                             "HF_DATASETS_CACHE)")
    parser.add_argument("--device")
    parser.add_argument("--dtype")


def cmd_eval(args: argparse.Namespace) -> int:
    """`igea eval PATH [--corpus FILES] [--tasks a,b] [--compare BASE] ...`."""
    from igea.config import EvalConfig
    from igea.errors import ConfigError
    from igea.evaluate import evaluate, format_results
    from igea.rundir import write_json_atomic

    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise IgeaError(f"--output: directory '{Path(args.output).parent}' does not exist; create it first")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    try:
        eval_config = EvalConfig(tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                 batch_size=args.batch_size)
    except ConfigError as err:  # name the flag the user typed, not the config key
        key, _, rest = str(err).partition(":")
        raise ConfigError(f"--{key.removeprefix('eval.').replace('_', '-')}:{rest}") from None
    corpus = held_out_argument(args.corpus) if args.corpus else None
    results = evaluate(args.path, corpus=corpus, compare=args.compare, eval_config=eval_config,
                       block_size=args.block_size, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    print(format_results(results))
    if args.output:
        write_json_atomic(Path(args.output), results)
        what = "results with per-question predictions" if tasks else "results"
        print(f"\n{what} written to {args.output}")
    return 0


SET_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.+)$")


def held_out_argument(groups: list[list[str]]) -> str | list[str] | dict[str, list[str]]:
    """`--corpus` values as `evaluate` takes them: named sets (`--corpus biomed=a.txt b.txt --corpus general=c.txt`)
    or one unnamed set of every file given (a single hub id stays a string)."""
    named: dict[str, list[str]] = {}
    unnamed: list[str] = []
    for group in groups:
        match = SET_NAME.match(group[0])
        if match is None:
            unnamed += group
            continue
        name = match.group(1)
        if name in named:
            raise IgeaError(f"--corpus: two held-out sets are named '{name}'; give each a distinct name")
        named[name] = [match.group(2), *group[1:]]
    if named and unnamed:
        raise IgeaError(f"--corpus: name every held-out set (NAME=FILES) or none; '{unnamed[0]}' has no name")
    if named:
        return named
    return unnamed[0] if len(unnamed) == 1 else unnamed


# ----------------------------------------------------------------------------------------------------------
# igea merge


def add_merge(commands) -> None:
    parser = _command(commands, "merge", cmd_merge,
                      "merge a run back towards its base and average its checkpoints; score, plot, write one")
    parser.add_argument("run", help="run directory (or a model directory, with --base and --corpus)")
    parser.add_argument("--base", metavar="MODEL", help="the base to merge with (default: the run's own)")
    parser.add_argument("--alphas", default="0.25,0.5,0.75",
                        help="comma-separated weights of the run: (1 - alpha) base + alpha run (default: %(default)s;"
                             " the base, alpha 0, and the run, alpha 1, are always scored)")
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="leave out the run's checkpoints and their average")
    parser.add_argument("--corpus", nargs="+", action="append", metavar="[NAME=]FILE",
                        help="held-out sets as for igea eval (default: the run's own held-out sets)")
    parser.add_argument("--tasks", nargs="?", const=True, metavar="a,b",
                        help="also score benchmarks: these, or with no value the run's eval.tasks")
    parser.add_argument("--limit", type=int,
                        help="score only the first N questions of each task (default: the run's eval.limit)")
    parser.add_argument("--num-fewshot", type=int,
                        help="examples before each question (default: the run's eval.num_fewshot, else the task's)")
    parser.add_argument("--batch-size", type=int,
                        help="blocks and questions scored together (default: the run's eval.batch_size, else 8)")
    parser.add_argument("--block-size", type=int, help="held-out block length with --corpus (default: the run's)")
    parser.add_argument("--domain", metavar="SET", help="the plot's domain set, x axis (default: the first set)")
    parser.add_argument("--general", metavar="SET", help="the plot's general set, y axis (default: the others)")
    parser.add_argument("--plot", metavar="PNG", help="where the plot goes, merge.json beside it, without --output "
                                                      "(default: RUN/merge.png; with --output: in DIR)")
    parser.add_argument("--pick", metavar="ALPHA", help="the point to write: an alpha, or 'average'")
    parser.add_argument("--output", metavar="DIR", help="new or empty directory for the picked point's model")
    parser.add_argument("--device")


def cmd_merge(args: argparse.Namespace) -> int:
    """`igea merge RUN [--alphas ...] [--pick ALPHA --output DIR]`: print the table, say what was written."""
    from igea.errors import ConfigError
    from igea.merge import merge

    try:
        alphas = [a.strip() for a in args.alphas.split(",") if a.strip()]
        settings = {"num_fewshot": args.num_fewshot, "limit": args.limit, "batch_size": args.batch_size}
        eval_config = {k: v for k, v in settings.items() if v is not None}  # the run's own for the others
        tasks = args.tasks if args.tasks in (True, None) else [t.strip() for t in args.tasks.split(",") if t.strip()]
        results = merge(args.run, base=args.base, alphas=alphas, checkpoints=not args.no_checkpoints,
                        corpus=held_out_argument(args.corpus) if args.corpus else None, tasks=tasks,
                        domain=args.domain, general=args.general, pick=args.pick, output=args.output, plot=args.plot,
                        eval_config=eval_config, block_size=args.block_size, device=args.device,
                        command=shlex.join(["igea", "merge", *sys.argv[2:]]) if args.output else None)
    except ConfigError as err:  # name the flag the user typed, not the argument
        key, _, rest = str(err).partition(":")
        raise ConfigError(f"--{key.removeprefix('eval.').replace('_', '-')}:{rest}") from None
    print(results["table"])
    if results["plot"]:
        print(f"\ntrade-off plot: {results['plot']}")
    if results["output"]:
        print(f"merged model ({results['picked']}) written to {results['output']}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# igea vocab


def add_vocab(commands) -> None:
    parser = _command(commands, "vocab", cmd_vocab,
                      "add tokens for a corpus' frequent words that the tokenizer splits into pieces")
    parser.add_argument("model", help="model directory, run directory or hub id")
    parser.add_argument("--corpus", nargs="+", required=True, metavar="FILE",
                        help="text to learn the tokens on: files, globs, directories or a hub dataset id")
    parser.add_argument("--num-tokens", type=int, required=True, metavar="N", help="how many tokens to add")
    parser.add_argument("--output", required=True, metavar="DIR", help="new (or empty) directory for the model")
    parser.add_argument("--heldout", nargs="+", metavar="FILE",
                        help="text to measure fertility on (default: 5%% of the corpus, left out of the counts)")
    parser.add_argument("--text-column", default="text", help="column of .jsonl/.csv/.parquet files and datasets")
    parser.add_argument("--max-documents", type=int, metavar="N", help="read at most N documents of the corpus")
    parser.add_argument("--fit-documents", type=int, metavar="N",
                        help="corpus documents (the first N, up to 512 tokens each) the new rows are fitted and "
                             "distilled on: a forward pass of the base model and a forward and backward pass of the "
                             "extended one per document; 0: none, the rows stay weighted means of their pieces' rows "
                             "(default: 1000 on a GPU; on a CPU fewer for a large model, 101 for 135M parameters)")
    parser.add_argument("--bits-per-byte", action=argparse.BooleanOptionalAction, default=True,
                        help="score the base and the extended (untrained) model in bits per byte on the held-out "
                             "text, to see what the new rows cost before training (default: on)")
    parser.add_argument("--bits-per-byte-documents", type=int, metavar="N",
                        help="held-out documents scored for bits per byte, by each model (default: 200; on a CPU no "
                             "more than the default of --fit-documents)")
    parser.add_argument("--device", help="where the models run: cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true")


def cmd_vocab(args: argparse.Namespace) -> int:
    from pathlib import Path

    from igea.config import DataConfig, ModelConfig
    from igea.progress import timed
    from igea.vocab import REPORT, check_device, check_output_dir, hold_out, read_texts

    for flag, value, low in (("--num-tokens", args.num_tokens, 1), ("--max-documents", args.max_documents, 1),
                             ("--fit-documents", args.fit_documents, 0),
                             ("--bits-per-byte-documents", args.bits_per_byte_documents, 1)):
        if value is not None and value < low:
            raise IgeaError(f"{flag}: {value} is not allowed; it must be {f'at least {low}' if low else '>= 0'}")
    check_device(args.device, "--device")
    check_output_dir(Path(args.output))
    corpus = args.corpus[0] if len(args.corpus) == 1 else args.corpus  # a hub id is a str
    reading = DataConfig(text_column=args.text_column)
    with timed(logging.getLogger("igea.vocab"), f"reading the corpus {corpus}", "corpus read"):
        texts = read_texts(corpus, "--corpus", reading, args.max_documents)
        if args.heldout:
            heldout = read_texts(args.heldout[0] if len(args.heldout) == 1 else args.heldout, "--heldout", reading)
        else:
            texts, heldout = hold_out(texts)
    model_config = ModelConfig(name_or_path=args.model, trust_remote_code=args.trust_remote_code)
    report = igea.extend_vocabulary(args.model, texts, args.num_tokens, args.output, heldout_texts=heldout,
                                    measure_bits_per_byte=args.bits_per_byte, model_config=model_config,
                                    corpus=corpus, fit_documents=args.fit_documents,
                                    bits_per_byte_documents=args.bits_per_byte_documents, device=args.device)
    summary = {k: v for k, v in report.items() if k != "new_tokens"}
    summary["first_new_tokens"] = [t["token"] for t in report["new_tokens"][:20]]  # as the vocabulary spells them
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"\nextended model saved in {args.output} (all {len(report['new_tokens'])} new tokens in {REPORT})")
    if "bits_per_byte" in report:
        bpb = report["bits_per_byte"]
        print(f"untrained, it scores {bpb['after']:.4f} bits per byte on {bpb['documents']} held-out documents, "
              f"the base model {bpb['before']:.4f} ({bpb['change']:+.1%}): what training has to win back first")
    return 0
