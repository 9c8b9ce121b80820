"""The napkin math: sizing answers reproduce the worked numbers of "How to Scale Your
Model", and the roofline predictor's terms follow from the model config by hand."""

import json
import subprocess
import sys

import pytest

from hpllm.config import make_config
from hpllm.perf import sizing
from hpllm.perf.hardware import CHIPS
from hpllm.perf.roofline import MeshShape, Workload, matmul_params, predict

V4 = CHIPS["tpu-v4"]


def test_worked_numbers():
    assert round(100 * sizing.mfu(189e12, 275e12), 1) == 68.7
    assert sizing.chips_for_prefill(70e9, 1_000_000, 10.0, V4) == pytest.approx(50.9, abs=0.05)
    assert sizing.chips_to_hold(70e9, 2, V4) == pytest.approx(4.4, abs=0.03)
    assert sizing.chips_for_decode_rate(70e9, 2, 100, V4) == pytest.approx(11.4, abs=0.05)
    # Gemma-7B: 28 layers, 16 KV heads of dim 256, bf16, a 2K-token sequence.
    assert sizing.kv_cache_bytes(28, 16, 256, 2048) / 1e6 == pytest.approx(939.5, abs=0.1)
    assert sizing.fsdp_min_batch_per_chip(V4) == pytest.approx(1018.5, abs=0.5)
    assert sizing.fsdp_min_batch_per_chip(V4, ici_bandwidth=1e11) == pytest.approx(2750)


def test_decode_prediction_is_weights_and_cache_over_bandwidth():
    config = make_config("smollm2-135m", ["--compute_dtype=bfloat16"]).model
    pred = predict(config, Workload("decode", 1, context=4096), CHIPS["h100"])
    assert pred.bound == "memory"
    weights = matmul_params(config) * 2  # bf16, the tied embedding read as the output matrix
    cache = 2 * config.n_layers * 4096 * config.n_kv_heads * config.head_dim * 2
    # plus the activations and the decode scores, a few percent
    assert weights + cache < pred.bytes < 1.05 * (weights + cache)
    assert pred.step_s == pytest.approx(pred.bytes / 3350e9, rel=0.01)


def test_train_prediction_counts_6n_flops_and_shards_over_the_mesh():
    model = make_config("small", []).model
    one = predict(model, Workload("train", 64, 512), V4, attention="flash")
    weight_flops = 6 * (matmul_params(model)) * 64 * 512
    mm = sum(t.flops for t in one.terms if t.name in ("weight matmuls", "output projection"))
    assert mm == pytest.approx(weight_flops, rel=1e-9)
    eight = predict(model, Workload("train", 64, 512), V4, MeshShape(data=2, fsdp=4),
                    attention="flash")
    assert eight.flops == pytest.approx(one.flops / 8, rel=0.01)
    assert eight.memory["optimizer"] == pytest.approx(one.memory["optimizer"] / 4)
    names = [c.name for c in eight.collectives]
    assert names == ["all-gather weights x2", "reduce-scatter grads", "all-reduce grads"]
    assert not one.collectives
    # Tensor parallelism adds activation collectives that grow with the tokens per device.
    tp = predict(model, Workload("train", 64, 512), V4, MeshShape(tensor=4), attention="flash")
    assert tp.collectives[0].axis == "tensor" and tp.comm_s > 0


def test_remat_trades_activation_memory():
    model = make_config("small", []).model
    mem = {r: predict(model, Workload("train", 16, 512), V4, remat=r,
                      attention="flash").memory["activations"] for r in ("none", "dots", "full")}
    assert mem["full"] < mem["dots"] < mem["none"]


def test_cli_prints_table_json_and_plot(tmp_path):
    out = subprocess.run([sys.executable, "-m", "hpllm.cli", "roofline", "--preset", "tiny",
                          "--workload", "decode", "--context", "64", "--measure",
                          "--repeats", "2", "--json", str(tmp_path / "r.json"),
                          "--plot", str(tmp_path / "r.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "predicted step" in out.stdout and "measured" in out.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["measured_s"] > 0 and data["predicted_s"] > 0 and data["bound"] == "memory"
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "hpllm.cli", "roofline", "--mesh", "pipe=2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "bad workload or --mesh" in bad.stderr
