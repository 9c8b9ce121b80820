"""`hpllm cost`: the course's training-energy table, LLaMA-7B from 6·P·T, and the serving
figures of the course text (instance prices, BLOOM-176B's weights, Falcon's KV caches)."""

import argparse

import pytest

from hpllm import cli
from hpllm.config import ConfigError
from hpllm.perf import cost
from hpllm.perf.hardware import CHIPS

A100 = CHIPS["a100"]


@pytest.mark.parametrize("model", sorted(cost.COURSE_TRAINING))
def test_reproduces_the_course_training_table(model):
    hours, mwh, tco2e = cost.COURSE_TRAINING[model]
    got = cost.train_cost(hours, cost.chip_watts(A100))  # default: the A100's 400 W TDP
    # The table rounds to whole MWh and tonnes: within 2 % (and 1 unit for the small rows).
    assert got.energy_mwh == pytest.approx(mwh, rel=0.02, abs=0.5)
    assert got.tco2e == pytest.approx(tco2e, rel=0.02, abs=0.5)


def test_formats_as_the_issue_asks():
    assert str(cost.train_cost(82_432, 400)) == "82,432 GPU-hours, 36.3 MWh, 14.0 tCO2e"
    # energy is linear in each factor
    base = cost.train_cost(1000, 400)
    assert cost.train_cost(1000, 400, pue=2.2).energy_mwh == pytest.approx(2 * base.energy_mwh)
    assert cost.train_cost(1000, 400, grid=0.0).tco2e == 0.0


def test_llama_7b_from_six_p_t():
    # 6 x 6.7e9 x 1e12 FLOPs at 50 % of 312 TFLOP/s: 71,581 GPU-hours against 82,432
    # reported, i.e. the run reached 43 % MFU.
    hours = cost.gpu_hours_for(6.7e9, 1e12, A100, 0.5)
    assert hours == pytest.approx(6 * 6.7e9 * 1e12 / (312e12 * 0.5) / 3600, rel=1e-12)
    assert round(hours) == 71_581
    assert 0.5 * hours / 82_432 == pytest.approx(0.434, abs=0.001)


def test_bad_training_inputs_are_one_line_errors():
    with pytest.raises(cost.CostError, match="no published TDP"):
        cost.chip_watts(CHIPS["tpu-v5e"])
    assert cost.chip_watts(CHIPS["tpu-v5e"], 200) == 200
    with pytest.raises(cost.CostError, match="mfu"):
        cost.gpu_hours_for(1e9, 1e9, A100, 1.5)
    with pytest.raises(cost.CostError):
        cost.train_cost(100, 400, pue=0.9)
    assert issubclass(cost.CostError, ConfigError)  # the CLI prints it as hpllm: error: ...


def test_serving_memory_figures_of_the_course():
    assert cost.weight_bytes(176e9, "bfloat16") == 352e9  # BLOOM-176B
    f7, f40 = cost.MODELS["falcon-7b"], cost.MODELS["falcon-40b"]
    # By hand: 2 (K and V) x layers x KV heads x head dim x tokens x 2 bytes.
    assert cost.kv_bytes(f7, 2048) == 2 * 32 * 1 * 64 * 2048 * 2 == 16 * 2**20
    assert cost.kv_bytes(f40, 2048) == 2 * 60 * 8 * 64 * 2048 * 2 == 240 * 2**20
    # The course's cells, swapped: 240 MB is Falcon-40B's, ~20 MB Falcon-7B's.
    assert cost.kv_bytes(f40, 2048) / 2**20 == cost.COURSE_KV_2048["falcon-7b"] / 1e6
    assert cost.kv_bytes(f7, 2048) / 1e6 == pytest.approx(cost.COURSE_KV_2048["falcon-40b"]
                                                          / 1e6, rel=0.2)
    with pytest.raises(cost.CostError, match="unknown dtype"):
        cost.weight_bytes(1e9, "fp12")


def test_dollars_per_million_tokens():
    g5 = cost.instance("g5.12xlarge")
    assert (g5.dollars_per_hour, g5.gpus) == (6.3317, 4)
    assert cost.instance("g5.48xlarge").dollars_per_hour == 18.1823
    # 1,000 tokens/s for an hour is 3.6 M tokens: $6.3317 / 3.6
    assert cost.dollars_per_million_tokens(6.3317, 1000) == pytest.approx(6.3317 / 3.6)
    with pytest.raises(cost.CostError, match="unknown instance"):
        cost.instance("p9.huge")


def test_decode_throughput_is_the_decode_roofline():
    a10g = CHIPS["a10g"]
    # Falcon-7B bf16 on 4 A10G, batch 1: 14 GB of weights over 4 x 600 GB/s.
    kv = cost.kv_bytes(cost.MODELS["falcon-7b"], 2048)
    one = cost.decode_tokens_per_s(7e9, 2, a10g, 4, 1, kv)
    assert one == pytest.approx(4 * 600e9 / (14e9 + kv), rel=1e-12)
    # A larger batch shares the weight reads; at a huge batch the compute bound takes over.
    assert cost.decode_tokens_per_s(7e9, 2, a10g, 4, 32, kv) > 25 * one
    huge = cost.decode_tokens_per_s(7e9, 2, a10g, 4, 100_000, 0.0)
    assert huge == pytest.approx(4 * a10g.peak("bfloat16") / (2 * 7e9), rel=1e-12)


def _run(argv, capsys):
    ap = argparse.ArgumentParser()
    cli._cost_parsers(ap.add_subparsers(dest="command"))
    args, extra = ap.parse_known_args(argv)
    assert args.fn(args, extra) == 0
    return capsys.readouterr().out


def test_cli_train_and_serve(capsys):
    out = _run(["cost", "train", "--gpu-hours", "82432"], capsys)
    assert out.startswith("82,432 GPU-hours, 36.3 MWh, 14.0 tCO2e (NVIDIA A100")
    out = _run(["cost", "train", "--params", "6.7e9", "--tokens", "1e12", "--mfu", "0.5"],
               capsys)
    assert "71,581 GPU-hours" in out
    out = _run(["cost", "serve", "--model", "falcon-40b", "--instance", "g5.12xlarge"], capsys)
    assert "KV cache 251.7 MB per 2,048-token sequence" in out and "swapped" in out
    assert "$6.3317/h" in out and "per million output tokens" in out
    out = _run(["cost", "serve", "--price", "3.6", "--gpus", "1", "--chip", "a100",
                "--tokens-per-s", "1000"], capsys)
    assert "1,000 output tokens/s (given): $1.00 per million output tokens" in out
    with pytest.raises(ConfigError, match="--price needs --gpus"):
        _run(["cost", "serve", "--price", "3.6"], capsys)
