"""`serve`, `generate` and `chat` options generated from the config dataclasses: types,
defaults, both spellings, and bad values as the one-line error of `train`. Nothing is loaded:
the commands are stopped (or captured) right after their options are parsed."""

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

import hpllm.serve.api
from hpllm import cli
from hpllm.config import (ConfigError, EngineConfig, ServerConfig, add_options, from_options,
                          option_dest)
from hpllm.infer.sampling import SamplingParams


@dataclass(frozen=True)
class Knobs:
    count: int = 3  # how many
    rate: float = 0.5
    name: str = "a"
    flag: bool = False
    limit: int | None = None


def _parse(argv, **kw):
    p = argparse.ArgumentParser()
    add_options(p, Knobs, **kw)
    return from_options(Knobs, p.parse_args(argv)), p


def test_fields_become_typed_options_with_their_defaults():
    assert _parse([])[0] == Knobs()
    got, _ = _parse(["--count=7", "--rate", "2", "--name=b c", "--flag", "--limit=4"])
    assert got == Knobs(7, 2.0, "b c", True, 4)
    assert type(got.rate) is float and type(got.count) is int
    assert _parse(["--flag=false"])[0].flag is False
    assert _parse([], defaults={"count": 9})[0].count == 9


def test_dashed_spellings_and_aliases_set_the_same_field():
    got, p = _parse(["--limit", "2", "--how-many", "5"], aliases={"count": ("--how-many",)})
    assert (got.count, got.limit) == (5, 2)
    text = p.format_help()
    assert "--count INT" in text and "how many (default: 3)" in text
    assert "--how-many" not in text  # other spellings stay out of --help


@pytest.mark.parametrize("argv, message", [
    (["--count=abc"], "count expects int, got 'abc'"),
    (["--rate=fast"], "rate expects float, got 'fast'"),
    (["--flag=maybe"], "flag expects bool, got 'maybe'"),
    (["--limit=1.5"], "limit expects int, got '1.5'"),
])
def test_bad_values_are_config_errors_naming_the_field(argv, message):
    with pytest.raises(ConfigError) as err:
        _parse(argv)
    assert str(err.value) == message


def test_two_dataclasses_keep_fields_of_one_name_apart():
    p = argparse.ArgumentParser()
    add_options(p, SamplingParams, only=("seed", "max_tokens"))
    add_options(p, EngineConfig, only=("speculative", "num_speculative_tokens"))
    args = p.parse_args(["--seed=5", "--speculative=ngram"])
    assert from_options(SamplingParams, args) == SamplingParams(seed=5)
    assert from_options(EngineConfig, args) == EngineConfig(speculative="ngram")  # seed 0
    assert option_dest(EngineConfig, "seed") not in vars(args)


@pytest.fixture
def served(monkeypatch):
    calls = []
    monkeypatch.setattr(hpllm.serve.api, "serve", lambda model, **kw: calls.append(
        (model, kw)) or 0)
    return calls


def test_serve_options_reach_engine_and_server_configs(served):
    assert cli.main(["serve", "m", "--max_num_seqs=8", "--kv_dtype=int8", "--port=9000",
                     "--speculative=self", "--draft_layers=1", "--enable_prefix_caching=false",
                     "--served_model_name=x"]) == 0
    model, kw = served[0]
    assert model == "m" and kw["engine_config"] == EngineConfig(
        max_num_seqs=8, kv_dtype="int8", speculative="self", draft_layers=1,
        enable_prefix_caching=False)
    server = dataclasses.asdict(ServerConfig(port=9000, served_model_name="x"))
    assert {k: kw[k] for k in server} == server
    assert kw["quant"] == ""  # as stored


def test_serve_defaults_are_the_dataclass_defaults_and_old_spellings_work(served):
    assert cli.main(["serve", "m"]) == 0
    assert served[0][1]["engine_config"] == EngineConfig()
    assert served[0][1]["port"] == ServerConfig().port
    assert cli.main(["serve", "m", "--max-num-seqs", "4", "--kv-memory", "8",
                     "--no-prefix-caching", "--max-pending", "3", "--kv-dtype", "bfloat16"]) == 0
    kw = served[1][1]
    assert kw["engine_config"] == EngineConfig(max_num_seqs=4, kv_memory_mb=8.0,
                                               enable_prefix_caching=False, kv_dtype="bfloat16")
    assert kw["max_pending"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--max_num_seqs=abc"], "max_num_seqs expects int, got 'abc'"),
    (["--kv_dtype=float"], "kv_dtype must be one of float32, bfloat16, int8, got 'float'"),
    (["--dtype=int8"], "dtype must be one of float32, bfloat16, got 'int8'"),
    (["--speculative=medusa"], "speculative must be one of ngram, self, draft"),
    (["--max-num-seqs", "0"], "max_num_seqs must be positive, got 0"),
    (["--port=0"], "port must be in 1..65535, got 0"),
    (["--drain_timeout=soon"], "drain_timeout expects float, got 'soon'"),
    (["--max_num_seqz=8"], "unrecognized arguments: --max_num_seqz=8"),
])
def test_serve_bad_options_are_one_line_and_exit_2(served, capsys, argv, message):
    assert cli.main(["serve", "m", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpllm: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not served


@pytest.fixture
def parsed(monkeypatch):
    """generate/chat parsed but not run: their SamplingParams and EngineConfig."""
    got = []

    def capture(args, extra):
        got.append(cli._sampling(args))
        return 0

    monkeypatch.setattr(cli, "cmd_generate", capture)
    monkeypatch.setattr(cli, "cmd_chat", capture)
    return got


def test_generate_and_chat_keep_their_own_sampling_defaults(parsed):
    assert cli.main(["generate", "m", "--prompt", "x"]) == 0
    assert cli.main(["chat", "m"]) == 0
    assert parsed[0] == (SamplingParams(max_tokens=128, temperature=0.0, seed=0), EngineConfig())
    assert parsed[1] == (SamplingParams(max_tokens=256, temperature=0.7, top_p=0.9, seed=0),
                         EngineConfig())


def test_generate_options_both_spellings(parsed):
    assert cli.main(["generate", "m", "--prompt", "x", "--max_tokens=5", "--top-p", "0.5",
                     "--kv_dtype=int8", "--speculative=ngram", "--gamma", "3", "--seed=2"]) == 0
    assert cli.main(["chat", "m", "--kv-cache", "int8", "--temperature=0"]) == 0
    assert parsed[0] == (SamplingParams(max_tokens=5, temperature=0.0, top_p=0.5, seed=2),
                         EngineConfig(kv_dtype="int8", speculative="ngram",
                                      num_speculative_tokens=3))
    assert parsed[1] == (SamplingParams(max_tokens=256, temperature=0.0, top_p=0.9, seed=0),
                         EngineConfig(kv_dtype="int8"))


@pytest.mark.parametrize("argv, message", [
    (["--max_tokens=many"], "max_tokens expects int, got 'many'"),
    (["--kv_dtype=float"], "kv_dtype must be one of float32, bfloat16, int8, got 'float'"),
    (["--top_p=0"], "0 < --top-p <= 1"),
    (["--num_speculative_tokens=x"], "num_speculative_tokens expects int, got 'x'"),
    (["--speculative=medusa"], "speculative must be one of ngram, self, draft"),
])
def test_generate_bad_options_stop_before_loading(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("loaded a model"))
    assert cli.main(["generate", "m", "--prompt", "x", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpllm: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
