"""igea.Generator and `igea generate`: seeds, batching, streaming, pipeline compatibility, errors, CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import pipeline

import igea
from igea.cli import main
from igea.config import GenerationConfig
from igea.errors import ConfigError, IgeaError
from igea.generate import Generator, generated_lengths

from conftest import make_config, real_abstracts

ROOT = Path(__file__).resolve().parents[1]
GREEDY = {"do_sample": False, "max_new_tokens": 12}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Token-by-token decoding of a tiny model is dominated by thread hand-offs on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generator(tiny_model_dir) -> Generator:
    return Generator.from_pretrained(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Openings of real abstracts, 1 to 40 words long, so that a batch needs a lot of left padding."""
    texts = real_abstracts("dev", limit=5)
    return [" ".join(text.split()[:n]) + " " for text, n in zip(texts, (1, 40, 5, 17, 2), strict=True)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, corpus_file) -> Path:
    """A run directory written by igea.train (2 steps), with a greedy `generation:` section."""
    cfg = make_config(
        tmp_path_factory.mktemp("gen-run"), tiny_model_dir, corpus_file,
        data={"validation_split": 0},
        training={"max_steps": 2, "save_strategy": "no"},
        generation={"prompts": [], "max_new_tokens": 6, "do_sample": False, "seed": None},
    )
    return igea.train(cfg).output_dir


# ----------------------------------------------------------------------------------------------------------
# Library


def test_same_seed_gives_same_text_whatever_the_rng_state(generator, prompts):
    first = generator.generate(prompts, max_new_tokens=16, seed=7)
    torch.rand(1000)  # consume the global RNG between the calls
    assert generator.generate(prompts, max_new_tokens=16, seed=7) == first
    assert generator.generate(prompts, max_new_tokens=16, seed=8) != first


def test_batched_greedy_equals_one_prompt_at_a_time(generator, prompts):
    one_by_one = [generator.generate(p, **GREEDY)[0] for p in prompts]
    assert generator.generate(prompts, **GREEDY) == one_by_one
    assert generator.generate(prompts, batch_size=2, **GREEDY) == one_by_one


def test_full_text_is_prompt_plus_continuation_for_each_returned_sequence(generator, prompts):
    settings = {"max_new_tokens": 5, "num_return_sequences": 3, "seed": 1}
    texts = generator.generate(prompts[:2], **settings)
    full = generator.generate(prompts[:2], full_text=True, **settings)
    expected_prompts = [prompts[0]] * 3 + [prompts[1]] * 3
    assert full == [p + t for p, t in zip(expected_prompts, texts, strict=True)]
    assert [c.prompt for c in generator.complete(prompts[:2], **settings)] == expected_prompts


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_continuation_matches_model_generate(tiny_model_dir, prompts, dtype):
    """The reference: the model's own generate on the unpadded ids, new tokens decoded alone."""
    generator = Generator.from_pretrained(str(tiny_model_dir), device="cpu", dtype=dtype)
    assert generator.model.dtype == getattr(torch, dtype)
    ids = generator.tokenizer(prompts[1], return_tensors="pt")
    reference = generator.model.generate(**ids, max_new_tokens=12, do_sample=False)
    expected = generator.tokenizer.decode(reference[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    [completion] = generator.complete(prompts[1], **GREEDY)
    assert completion.text == expected
    assert completion.tokens == len(reference[0]) - ids["input_ids"].shape[1]
    assert completion.seconds > 0


def test_generated_lengths_stop_at_the_first_eos():
    new_tokens = torch.tensor([[5, 7, 1, 3, 3], [5, 6, 7, 8, 9], [1, 1, 1, 1, 1], [4, 2, 4, 2, 2]])
    assert generated_lengths(new_tokens, [1]) == [3, 5, 1, 5]
    assert generated_lengths(new_tokens, [1, 2]) == [3, 5, 1, 2]
    assert generated_lengths(new_tokens, []) == [5, 5, 5, 5]


@pytest.mark.parametrize("settings", [GREEDY, {"max_new_tokens": 24, "seed": 3, "temperature": 0.7}])
def test_stream_yields_the_text_of_generate_in_pieces(generator, prompts, settings):
    pieces = list(generator.stream(prompts[3], **settings))
    assert len(pieces) > 1
    assert "".join(pieces) == generator.generate(prompts[3], **settings)[0]


def test_closing_a_stream_stops_the_generation(generator, monkeypatch):
    lengths = []
    original = generator.model.generate

    def recording_generate(**kwargs):
        output = original(**kwargs)
        lengths.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    monkeypatch.setattr(generator.model, "generate", recording_generate)
    stream = generator.stream("Il fegato è ", do_sample=False, max_new_tokens=480)
    next(stream)
    stream.close()  # joins the generating thread
    assert len(lengths) == 1 and lengths[0] < 480


def test_stream_raises_what_failed_in_its_thread(generator, monkeypatch):
    def broken_generate(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(generator.model, "generate", broken_generate)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(generator.stream("Il fegato è ", **GREEDY))


def test_run_dir_loads_in_plain_transformers_pipeline(run_dir):
    pipe = pipeline("text-generation", model=str(run_dir), device="cpu")
    generator = Generator.from_pretrained(str(run_dir), device="cpu")
    prompt = "Il fegato è "
    new = pipe(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    full = pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert generator.generate(prompt) == [new]  # the run's generation section: greedy, 6 new tokens
    assert generator.generate(prompt, full_text=True) == [full]


def test_run_dir_generation_section_is_the_default(run_dir, tiny_model_dir):
    assert Generator.from_pretrained(str(run_dir), device="cpu").config == GenerationConfig(
        prompts=[], max_new_tokens=6, do_sample=False, seed=None
    )
    assert Generator.from_pretrained(str(tiny_model_dir), device="cpu").config == GenerationConfig()


def test_generate_function_equals_generator(tiny_model_dir, generator, prompts):
    assert igea.generate(str(tiny_model_dir), prompts[:2], device="cpu", **GREEDY) == generator.generate(
        prompts[:2], **GREEDY
    )


# ----------------------------------------------------------------------------------------------------------
# Context length


def test_prompt_longer_than_the_context_is_refused(generator):
    long_prompt = " ".join(real_abstracts("dev")[:6])
    assert len(generator.tokenizer(long_prompt)["input_ids"]) > 512
    with pytest.raises(IgeaError, match=r"prompt 2 is \d+ tokens: .* context of 512 positions") as err:
        generator.generate(["Il fegato è ", long_prompt], **GREEDY)
    assert "\n" not in str(err.value)


def test_truncate_left_keeps_the_last_tokens_that_fit(generator):
    long_prompt = " ".join(real_abstracts("dev")[:6])
    kept = generator.tokenizer(long_prompt, return_tensors="pt")["input_ids"][:, -(512 - 12):]
    reference = generator.model.generate(kept, attention_mask=torch.ones_like(kept), **GREEDY)
    expected = generator.tokenizer.decode(reference[0, kept.shape[1]:], skip_special_tokens=True)
    assert generator.generate(long_prompt, truncate_left=True, **GREEDY) == [expected]
    assert "".join(generator.stream(long_prompt, truncate_left=True, **GREEDY)) == expected


# ----------------------------------------------------------------------------------------------------------
# Errors: one clear line


@pytest.mark.parametrize(
    ("prompts", "message"),
    [([], "no prompts given"), (["Il fegato è ", ""], "prompt 2 is empty"), ([3], "prompt 1 is a int")],
)
def test_bad_prompts(generator, prompts, message):
    with pytest.raises(IgeaError, match=message):
        generator.generate(prompts, **GREEDY)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"temperature": 0}, "temperature: 0.0 is not allowed"),
        ({"top_p": 1.5}, r"top_p: 1.5 is not allowed; it must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, "max_new_tokens: 0 is not allowed"),
        ({"max_new_tokens": 512}, "less than the model's context of 512 positions"),
        ({"max_new_tokens": "many"}, "max_new_tokens: expected an integer, got 'many'"),
        ({"do_sample": False, "num_return_sequences": 2}, "num_return_sequences: 2 needs do_sample: true"),
        ({"max_tokens": 5}, "unknown key 'max_tokens'; did you mean 'max_new_tokens'"),
        ({"batch_size": 0}, "batch_size: 0 is not allowed"),
    ],
)
def test_bad_parameters(generator, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        generator.generate("Il fegato è ", **overrides)
    assert "\n" not in str(err.value)


def test_stream_refuses_several_sequences(generator):
    with pytest.raises(ConfigError, match="num_return_sequences: 2 is not allowed when streaming"):
        generator.stream("Il fegato è ", num_return_sequences=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"dtype": "float64"}, "dtype: 'float64' is not allowed; choose one of auto, float32"),
     ({"device": "nonsense"}, "device: 'nonsense' cannot be used")],
)
def test_bad_loading_options(tiny_model_dir, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Generator.from_pretrained(str(tiny_model_dir), **kwargs)


def test_missing_model_directory(tmp_path):
    with pytest.raises(IgeaError, match="cannot load model"):
        Generator.from_pretrained(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------------------
# CLI


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv, "--device", "cpu"])  # as the `generator` fixture, also on a GPU machine
    out, err = capsys.readouterr()
    return code, out, err


def jsonl(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_cli_prints_one_continuation_per_prompt(capsys, tiny_model_dir, generator, prompts):
    code, out, _ = cli(capsys, str(tiny_model_dir), *prompts[:2], "--max-new-tokens", "12", "--no-do-sample")
    assert code == 0
    assert out == "".join(t + "\n" for t in generator.generate(prompts[:2], **GREEDY))


def test_cli_jsonl_fields(capsys, tiny_model_dir, generator, prompts):
    code, out, _ = cli(capsys, str(tiny_model_dir), *prompts[:3], "--max-new-tokens", "12", "--no-do-sample",
                       "--jsonl", "--full-text")
    assert code == 0
    records = jsonl(out)
    assert [set(r) for r in records] == [{"prompt", "completion", "tokens", "seconds"}] * 3
    assert [r["prompt"] for r in records] == prompts[:3]
    assert [r["completion"] for r in records] == generator.generate(prompts[:3], full_text=True, **GREEDY)
    assert all(isinstance(r["tokens"], int) and 1 <= r["tokens"] <= 12 for r in records)
    assert all(r["seconds"] > 0 for r in records)


def test_cli_stream_prints_the_same_text(capsys, tiny_model_dir, prompts):
    args = (str(tiny_model_dir), *prompts[:2], "--max-new-tokens", "12", "--no-do-sample", "--full-text")
    assert cli(capsys, *args)[:2] == cli(capsys, *args, "--stream")[:2]


def test_cli_prompts_from_a_file(capsys, tmp_path, tiny_model_dir):
    path = tmp_path / "prompts.txt"
    path.write_text("Il fegato è \n\nLa fibrosi cistica\n", encoding="utf-8")
    code, out, _ = cli(capsys, str(tiny_model_dir), "Primo", "--file", str(path), "--max-new-tokens", "3",
                       "--jsonl")
    assert code == 0
    assert [r["prompt"] for r in jsonl(out)] == ["Primo", "Il fegato è ", "La fibrosi cistica"]


@pytest.mark.parametrize("file_args", [(), ("--file", "-")])
def test_cli_prompts_from_stdin(capsys, monkeypatch, tiny_model_dir, file_args):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Il fegato è \nI batteri\n"))
    code, out, _ = cli(capsys, str(tiny_model_dir), *file_args, "--max-new-tokens", "3", "--jsonl")
    assert code == 0
    assert [r["prompt"] for r in jsonl(out)] == ["Il fegato è ", "I batteri"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["Il fegato è ", "--temperature", "0"], "temperature: 0.0 is not allowed"),
        (["Il fegato è ", "--stream", "--num-return-sequences", "2"], "num_return_sequences: 2 is not"),
        (["Il fegato è ", "--stream", "--jsonl"], "--stream and --jsonl cannot be combined"),
        (["--file", "missing.txt"], "--file: 'missing.txt' does not exist"),
        ([], "no prompts"),
        (["Il fegato è ", "--dtype", "int8"], "dtype: 'int8' is not allowed"),
    ],
)
def test_cli_bad_options_exit_2_before_loading_the_model(capsys, monkeypatch, tiny_model_dir, argv, message):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = cli(capsys, str(tiny_model_dir), *argv)
    assert (code, out) == (2, "")
    assert err.startswith("igea: error: ") and message in err
    assert err.count("\n") == 1


def test_cli_too_long_prompt_exits_2(capsys, tiny_model_dir):
    code, out, err = cli(capsys, str(tiny_model_dir), "Il fegato è " * 400, "--max-new-tokens", "8")
    assert (code, out) == (2, "")
    last = err.splitlines()[-1]  # after the model's loading progress bar
    assert last.startswith("igea: error: prompt 1 is ") and "--truncate-left" in last


def test_cli_missing_model_exits_2(capsys, tmp_path):
    code, _, err = cli(capsys, str(tmp_path / "nowhere"), "Il fegato è ")
    assert code == 2 and "cannot load model" in err


# ----------------------------------------------------------------------------------------------------------
# Benchmark smoke run


@pytest.mark.slow
def test_bench_generate_quick_runs():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_generate.py"), "--quick"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "igea batched" in result.stdout and "speed-up" in result.stdout
