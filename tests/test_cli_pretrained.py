"""`hpllm generate`, `chat` and `eval-ppl` on SmolLM2-135M as real subprocesses, and the
one-line errors of bad model arguments."""

import os
import subprocess
import sys

import pytest

from hpllm.checkpoints.registry import pull
from hpllm.cli import main


def hpllm(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "hpllm.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XLA_FLAGS": ""})


@pytest.fixture(scope="module")
def gguf_path():
    return str(pull("smollm2-135m"))


def test_generate_streams_a_greedy_continuation(gguf_path):
    out = hpllm("generate", gguf_path, "--prompt", "The capital of France is", "--max-tokens", "6")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The capital of France is Paris")
    assert "loaded SmolLM2-135M-Instruct.Q4_1.gguf" in out.stderr
    assert "6 generated" in out.stderr


def test_chat_two_turns_from_a_pipe(gguf_path):
    out = hpllm("chat", "smollm2-135m", "--temperature", "0", "--max-tokens", "24",
                stdin="What is the capital of France?\nAnd of Italy?\n")
    assert out.returncode == 0, out.stderr
    replies = [line for line in out.stdout.splitlines() if line.strip()]
    assert "Paris" in out.stdout and "Rome" in out.stdout, out.stdout
    assert len(replies) >= 2 and out.stderr.count("prompt tokens") == 2
    assert "<|im" not in out.stdout  # the end-of-turn token stops the reply, unprinted


@pytest.mark.parametrize("args, message", [
    (["generate", "no/such/model.gguf", "--prompt", "x"], "no such file or directory"),
    (["generate", "llama-7b", "--prompt", "x"], "unknown model 'llama-7b'"),
    (["generate", "smollm2-135m", "--prompt", ""], "--prompt is empty"),
    (["generate", "smollm2-135m", "--prompt", "x", "--top-p", "0"], "top-p"),
    (["pull", "nope"], "unknown model 'nope'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_not_a_gguf_file_from_a_real_process(tmp_path):
    (tmp_path / "fake.gguf").write_text("not a model")
    out = hpllm("chat", str(tmp_path / "fake.gguf"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"hpllm: error: {tmp_path / 'fake.gguf'} is not a "
                                               "GGUF file (it does not start with 'GGUF')"]


def test_eval_ppl_command_prints_perplexity_and_bits_per_byte(capsys, gguf_path):
    assert main(["eval-ppl", gguf_path, "--tokens", "64", "--window", "64"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("Shakespeare validation: 64 tokens"), line
    ppl = float(line.split("perplexity ")[1].split(",")[0])
    bpb = float(line.split(" bits/byte")[0].rsplit(" ", 1)[1])
    assert 1 < ppl < 500 and 0.3 < bpb < 4.0, line
