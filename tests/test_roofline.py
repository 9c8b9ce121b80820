"""The napkin math: sizing answers reproduce the worked numbers of "How to Scale Your
Model", and the roofline predictor's terms follow from the model config by hand."""

import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from hpllm.cli import main
from hpllm.config import make_config
from hpllm.kernels import cpu_decoder
from hpllm.perf import sizing
from hpllm.perf.hardware import CHIPS
from hpllm.compress.quantize import quantize_params
from hpllm.model.kv_cache import DenseKVCache
from hpllm.model.transformer import forward, init_params, unstack_layers
from hpllm.perf.roofline import (DECODE_OPS_PER_LAYER, OPS_OUTSIDE_LAYERS, MeshShape,
                                 Workload, matmul_params, matmul_weight_bytes, predict,
                                 train_flops_per_token, train_kernel_prediction)
from hpllm.quantized import is_quantized
from known_hardware import write_known_figures

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


def test_decode_on_a_cpu_adds_the_measured_matvec_and_dispatch_terms():
    config = make_config("smollm2-135m", []).model
    cpu = dataclasses.replace(CHIPS["h100"], matvec_bandwidth=20e9, op_overhead_s=1e-6,
                              call_overhead_s=50e-6)
    workload = Workload("decode", 1, context=256)
    plain = predict(config, workload, CHIPS["h100"], compute_dtype="float32")
    pred = predict(config, workload, cpu, compute_dtype="float32")
    terms = {t.name: t for t in pred.terms}
    for name in ("weight matmuls", "output projection"):  # streamed at the mat-vec's rate
        assert terms[name].memory_s == pytest.approx(terms[name].bytes / 20e9)
    assert terms["attention (KV read)"].memory_s == pytest.approx(
        terms["attention (KV read)"].bytes / CHIPS["h100"].hbm_bandwidth)
    launches = config.n_layers * DECODE_OPS_PER_LAYER + OPS_OUTSIDE_LAYERS
    assert terms["dispatch"].seconds == pytest.approx(launches * 1e-6 + 50e-6)
    assert pred.step_s == pytest.approx(sum(t.seconds for t in pred.terms))
    assert "dispatch" not in {t.name for t in plain.terms}  # accelerators: no such terms
    # Prefill reuses each weight over many tokens: the mat-vec rate does not apply.
    prefill = predict(config, Workload("prefill", 1, 256), cpu, compute_dtype="float32")
    weights = next(t for t in prefill.terms if t.name == "weight matmuls")
    assert weights.memory_s == pytest.approx(weights.bytes / CHIPS["h100"].hbm_bandwidth)


def test_cli_prints_table_json_and_plot(tmp_path):
    # Known machine figures, so the prediction does not wait on (or vary with) a measurement.
    cache = tmp_path / "cache"
    write_known_figures(cache, 8)  # the tests' 8 simulated devices
    env = dict(os.environ, HPLLM_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-m", "hpllm.cli", "roofline", "--preset", "tiny",
                          "--workload", "decode", "--context", "64", "--measure",
                          "--repeats", "2", "--json", str(tmp_path / "r.json"),
                          "--plot", str(tmp_path / "r.png")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "predicted step" in out.stdout and "measured" in out.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["measured_s"] > 0 and data["predicted_s"] > 0 and data["bandwidth"] == 6e10
    # The tiny model's decode step is a few hundred launches of little work each.
    assert data["bound"] in ("memory", "overhead") and data["terms"][-1]["name"] == "dispatch"
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "hpllm.cli", "roofline", "--mesh", "pipe=2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "bad workload or --mesh" in bad.stderr


# A CPU with measured figures: the XLA and int8-kernel mat-vec chains, and the chains' FLOP/s
# at 8 and 32 rows (the batched decode step's matmul rate).
CPU = dataclasses.replace(CHIPS["h100"], peak_flops={"float32": 3e11, "bfloat16": 3e11},
                          hbm_bandwidth=40e9, matvec_bandwidth=30e9, int8_matvec_bandwidth=20e9,
                          op_overhead_s=5e-7, call_overhead_s=5e-5,
                          batched_flops={"float32": {"8": 6e10, "32": 1.5e11},
                                         "int8": {"8": 4e10, "32": 1e11}})


@pytest.mark.parametrize("preset,untied", [("tiny", False), ("tiny", True),
                                           ("smollm2-135m", False)])
@pytest.mark.parametrize("scheme", ["int8", "int8-zp"])
def test_predicted_quantized_bytes_are_the_models(preset, untied, scheme):
    """The predictor's int8 weight bytes (codes + scales, + zeros) are what quantize_params
    makes of the model's matrices: exactly, to the byte. (Shapes only: jax.eval_shape.)"""
    model = make_config(preset, ["--tie_embeddings=false"] if untied else []).model
    params = jax.eval_shape(lambda: quantize_params(init_params(model, jax.random.key(0)),
                                                    scheme))
    quantized = [w for w in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(w)]
    actual = sum(math.prod(a.shape) * a.dtype.itemsize for w in quantized
                 for a in jax.tree.leaves(w))
    stored = matmul_weight_bytes(model, "float32", scheme)
    # untied: the embedding table is quantized too, the same (V, D) matrix as the output
    assert actual == stored["layers"] + stored["output"] * (2 if untied else 1)
    pred = predict(model, Workload("decode", 1, context=32), CPU, compute_dtype="float32",
                   quant=scheme)
    terms = {t.name: t for t in pred.terms}
    # each weight term reads its stored weights plus the token's activations (float32: at
    # most ~1 MiB for SmolLM2's 30 layers)
    assert stored["layers"] < terms["weight matmuls"].bytes < stored["layers"] + 2**21
    assert stored["output"] < terms["output projection"].bytes < stored["output"] + 2**21
    float_bytes = matmul_weight_bytes(model, "float32")
    assert sum(float_bytes.values()) == 4 * matmul_params(model)
    assert 3.5 < sum(float_bytes.values()) / sum(stored.values()) < 4


def test_int8_decode_streams_at_the_kernel_rate():
    config = make_config("smollm2-135m", []).model
    workload = Workload("decode", 1, context=256)
    plain = predict(config, workload, CPU, compute_dtype="float32")
    int8 = predict(config, workload, CPU, compute_dtype="float32", quant="int8")
    for pred, rate in ((plain, 30e9), (int8, 20e9)):
        weights = next(t for t in pred.terms if t.name == "weight matmuls")
        assert weights.memory_s == pytest.approx(weights.bytes / rate)
        assert weights.compute_s == pytest.approx(weights.flops / 3e11)  # one row: the peak
    assert int8.memory["params"] < plain.memory["params"] / 3.5
    assert int8.flops == plain.flops  # the same products, from narrower weights
    with pytest.raises(ValueError, match="int8 or int8-zp, not 'int4'"):
        predict(config, workload, CPU, quant="int4")
    with pytest.raises(ValueError, match="inference"):
        predict(config, Workload("train", 1, 16), CPU, quant="int8")


def test_engine_step_reads_weights_once_and_kv_per_row():
    config = make_config("smollm2-135m", []).model
    steps = {b: predict(config, Workload("engine", b, context=256), CPU, compute_dtype="float32")
             for b in (1, 5, 8, 32, 100)}
    terms = {b: {t.name: t for t in p.terms} for b, p in steps.items()}
    # per row and layer: the 7 matmuls' inputs and outputs; then the final hidden state
    act = config.n_layers * (6 * config.dim + 2 * config.head_dim * (
        config.n_heads + config.n_kv_heads) + 3 * config.hidden_dim) + config.dim
    weights = terms[8]["weight matmuls"]
    # the weights once per step; the activations per row
    assert terms[32]["weight matmuls"].bytes - weights.bytes == pytest.approx(24 * act * 4)
    kv = 2 * config.n_layers * 256 * config.n_kv_heads * config.head_dim * 4
    attn = {b: terms[b]["attention (KV read)"].bytes for b in (8, 32)}
    assert attn[32] - attn[8] == pytest.approx(24 * (kv + 3 * config.n_layers
                                                      * config.n_heads * 256 * 4))
    # the matmuls compute at the rate measured at that many rows (5 pads up to 8's), beyond
    # the measured rows at the large-matmul peak
    assert weights.compute_s == pytest.approx(weights.flops / 6e10)
    assert terms[5]["weight matmuls"].compute_s == pytest.approx(
        terms[5]["weight matmuls"].flops / 6e10)
    assert terms[32]["output projection"].compute_s == pytest.approx(
        terms[32]["output projection"].flops / 1.5e11)
    assert terms[100]["weight matmuls"].compute_s == pytest.approx(
        terms[100]["weight matmuls"].flops / 3e11)
    assert terms[8]["dispatch"].seconds == terms[32]["dispatch"].seconds  # per step, not row
    assert steps[8].step_s == pytest.approx(sum(t.seconds for t in steps[8].terms))
    int8 = predict(config, Workload("engine", 8, context=256), CPU, compute_dtype="float32",
                   quant="int8")
    w8 = next(t for t in int8.terms if t.name == "weight matmuls")
    assert w8.compute_s == pytest.approx(w8.flops / 4e10)
    with pytest.raises(ValueError, match="context"):
        Workload("engine", 8)


KERNEL = "kernel" if cpu_decoder.available() else "xla"
# (arguments, the backend that runs them): the fused decoder kernel for float32 compute,
# XLA's program for bfloat16 or when asked
KERNEL_RUNS = ((["--workload", "decode", "--quant", "int8", "--compute_dtype=float32"], KERNEL),
               (["--workload", "engine", "--batch", "3", "--compute_dtype=float32"], KERNEL))
XLA_RUNS = ((["--workload", "engine", "--batch", "8", "--quant", "int8", "--backend", "xla"],
             "xla"), (["--workload", "decode", "--quant", "int8"], "xla"))


def test_cli_quantized_engine_and_backends(capsys):
    """`hpllm roofline --measure` in-process (the session's known figures): decode and engine
    steps run and are predicted on the backend generate() and the engine choose; bad
    arguments are one line each."""
    _check_runs(KERNEL_RUNS, capsys)
    for bad, message in ((["--quant", "int4", "--workload", "decode"], "not int4"),
                         (["--quant", "int8", "--workload", "train"], "--quant is for"),
                         (["--workload", "decode", "--backend", "kernel"], "--backend kernel:")):
        assert main(["roofline", "--preset", "tiny"] + bad) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1  # one line, no traceback
    with pytest.raises(SystemExit):
        main(["roofline", "--quant", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_xla_backend_workloads(capsys):
    _check_runs(XLA_RUNS, capsys)  # XLA's engine and int8 decode programs: compiling is slow


def _check_runs(runs, capsys):
    tiny = make_config("tiny", [])
    for extra, backend in runs:
        path = os.path.join(os.environ["HPLLM_CACHE"], "r.json")
        assert main(["roofline", "--preset", "tiny", "--context", "32", "--measure",
                     "--repeats", "2", "--json", path] + extra) == 0
        out = capsys.readouterr().out
        data = json.loads(open(path).read())
        quant = "int8" if "int8" in extra else ""
        assert data["quant"] == quant and data["measured_s"] > 0 and data["predicted_s"] > 0
        assert data["backend"] == backend and f"backend: {backend}" in out
        assert data["workload"]["kind"] == extra[1] and data["workload"]["context"] == 32
        dtype = "float32" if "--compute_dtype=float32" in extra else tiny.train.compute_dtype
        assert data["weight_bytes"] == sum(matmul_weight_bytes(tiny.model, dtype,
                                                               quant).values())
        names = [t["name"] for t in data["terms"]]
        assert ("layer phases" in names) == (backend == "kernel") != ("dispatch" in names)
        assert ("paged engine step" in out) == (extra[1] == "engine")
        if backend == "kernel" and extra[1] == "engine":  # 3 rows: 8 tokens, 4 logits rows
            assert "8 tokens (4 logits rows)" in out


# The fused decoder kernel's figures (hardware.measure_decoder): bytes/s of weights at one
# token, FLOP/s at several, attention FLOP/s, fixed costs per layer and call, by tokens.
KERNEL_CPU = dataclasses.replace(CPU, decoder={
    "stream_bandwidth": {"float32": 25e9, "int8": 20e9},
    "matmul_flops": {"float32": {"1": 1e10, "8": 8e10, "32": 2e11},
                     "int8": {"1": 3e10, "8": 1e11, "32": 2.5e11}},
    "attention_flops": {"1": 2e10, "8": 3e10, "32": 4e10},
    "layer_s": {"1": 4e-6, "8": 6e-6, "32": 2e-5}, "call_s": {"1": 5e-5, "8": 6e-5, "32": 9e-5}})


def test_kernel_prediction_is_the_kernels_measured_rates():
    config = make_config("smollm2-135m", []).model  # 30 layers, 9 heads of 64, dim 576
    layer_params = matmul_params(config) - config.dim * config.vocab_size
    for quant, stream, flops in (("", 25e9, 1e10), ("int8", 20e9, 3e10)):
        pred = predict(config, Workload("decode", 1, context=256), KERNEL_CPU, quant=quant,
                       backend="kernel")
        terms = {t.name: t for t in pred.terms}
        stored = matmul_weight_bytes(config, "float32", quant)  # the kernel's float32/int8
        weights, head = terms["weight matmuls"], terms["output projection"]
        assert weights.bytes == stored["layers"] and head.bytes == stored["output"]
        assert weights.memory_s == pytest.approx(stored["layers"] / stream)
        assert weights.compute_s == pytest.approx(2 * layer_params / flops)
        assert head.compute_s == pytest.approx(2 * config.dim * config.vocab_size / flops)
        assert terms["attention (KV read)"].compute_s == pytest.approx(
            4 * 30 * 9 * 64 * 256 / 2e10)
        assert terms["layer phases"].seconds == pytest.approx(30 * 4e-6)
        assert terms["call"].seconds == pytest.approx(5e-5)
        assert pred.step_s == pytest.approx(sum(t.seconds for t in pred.terms))
    # the engine pads 5 rows to 8 tokens and 8 logits rows; padding attends to nothing
    five = {t.name: t for t in predict(config, Workload("engine", 5, context=300), KERNEL_CPU,
                                       backend="kernel").terms}
    assert five["weight matmuls"].compute_s == pytest.approx(8 * 2 * layer_params / 8e10)
    assert five["attention (KV read)"].flops == 4 * 5 * 30 * 9 * 64 * 300
    assert five["attention (KV read)"].compute_s == pytest.approx(4 * 5 * 30 * 9 * 64 * 300
                                                                  / 3e10)
    assert five["layer phases"].seconds == pytest.approx(30 * 6e-6)
    # beyond the measured token counts: the largest's rates
    many = {t.name: t for t in predict(config, Workload("engine", 100, context=64), KERNEL_CPU,
                                       backend="kernel").terms}
    assert many["weight matmuls"].compute_s == pytest.approx(128 * 2 * layer_params / 2e11)
    assert many["call"].seconds == pytest.approx(9e-5)
    for kwargs, message in (({"chip": CPU}, "no measured decoder-kernel figures"),
                            ({"workload": Workload("prefill", 1, 16)}, "decode and engine"),
                            ({"quant": "int8-zp"}, "no 'int8-zp' weights"),
                            ({"backend": "pallas"}, "backend must be")):
        args = dict(model=config, workload=Workload("decode", 1, context=8), chip=KERNEL_CPU,
                    backend="kernel") | kwargs
        with pytest.raises(ValueError, match=message):
            predict(**args)


# Measured one-row dot times by matrix bytes (float32 and int8) and the paged kernel's rate.
TABLE_CPU = dataclasses.replace(
    CPU, matvec_dot_s=5e-6, int8_matvec_dot_s=9e-6,
    matvec_seconds={"float32": [[5e5, 20e-6], [4e6, 110e-6]], "int8": [[1e5, 8e-6],
                                                                     [1e6, 30e-6]]},
    paged_attention_flops={"8": 1e10, "32": 2e10}, decode_attention_flops=4e9)


def test_one_row_dots_take_the_measured_time_of_their_size():
    config = make_config("smollm2-135m", []).model  # dim 576, KV 192, hidden 1536
    decode = Workload("decode", 1, context=256)

    def between(b, b0, s0, b1, s1):  # the table's straight line
        return s0 + (s1 - s0) * (b - b0) / (b1 - b0)

    for quant, rows in (("", 0), ("int8", 4)):
        pred = predict(config, decode, TABLE_CPU, compute_dtype="float32", quant=quant)
        terms = {t.name: t for t in pred.terms}
        if quant:  # codes + a float32 scale per output row; all inside the table but q/o
            qo, kv, mlp = (576 * 576 + 576 * rows, 192 * 576 + 192 * rows,
                           1536 * 576 + 1536 * rows)
            line = functools.partial(between, b0=1e5, s0=8e-6, b1=1e6, s1=30e-6)
            # the 49152 x 576 output projection is beyond the table: the largest's rate
            output = 30e-6 * (49152 * 576 + 49152 * rows) / 1e6
            down = 576 * 1536 + 576 * rows  # 576 output rows, each with its scale
            layer = 2 * line(qo) + 2 * line(kv) + 2 * line(mlp) + line(down)
        else:
            qo, kv, mlp = 576 * 576 * 4, 192 * 576 * 4, 1536 * 576 * 4
            line = functools.partial(between, b0=5e5, s0=20e-6, b1=4e6, s1=110e-6)
            output = 110e-6 * 49152 * 576 * 4 / 4e6
            layer = 2 * line(qo) + 2 * 20e-6 + 3 * line(mlp)  # K/V: below the table
        assert terms["weight matmuls"].memory_s == pytest.approx(30 * layer)
        assert terms["output projection"].memory_s == pytest.approx(output)
        # the dots' launches and fixed costs are in their times, not in dispatch again
        launches = 30 * (DECODE_OPS_PER_LAYER - 7) + OPS_OUTSIDE_LAYERS - 1
        assert terms["dispatch"].seconds == pytest.approx(launches * 5e-7 + 5e-5)
        # one token over the dense cache at the measured attention rate: 9 heads of 64
        attention = terms["attention (KV read)"]
        assert attention.flops == 4 * 30 * 9 * 64 * 256
        assert attention.compute_s == pytest.approx(attention.flops / 4e9)
    # several rows compute at the batched rate, as without a table
    eight = predict(config, Workload("engine", 8, context=256), TABLE_CPU,
                    compute_dtype="float32")
    weights = next(t for t in eight.terms if t.name == "weight matmuls")
    assert weights.memory_s == pytest.approx(weights.bytes / 30e9)


def test_engine_attention_at_the_measured_paged_kernel_rate():
    config = make_config("smollm2-135m", []).model  # 30 layers, 9 heads of 64
    for batch, context, rows, keys, rate in ((5, 300, 8, 512, 1e10), (32, 256, 32, 256, 2e10)):
        pred = predict(config, Workload("engine", batch, context=context), TABLE_CPU,
                       compute_dtype="float32")
        attention = next(t for t in pred.terms if t.name == "attention (KV read)")
        # every padded row over whole 256-key steps of the online kernel
        assert attention.flops == 4 * rows * 30 * 9 * 64 * keys
        assert attention.compute_s == pytest.approx(attention.flops / rate)
    plain = predict(config, Workload("engine", 32, context=256), CPU, compute_dtype="float32")
    attention = next(t for t in plain.terms if t.name == "attention (KV read)")
    assert attention.flops == 4 * 32 * 30 * 9 * 64 * 256  # no rate measured: the napkin's
    assert attention.compute_s == pytest.approx(attention.flops / 3e11)


def test_decode_launches_what_xla_compiles():
    """The dispatch term's ops per layer are the thunks XLA:CPU's compiled decode step runs
    (fusions and dots; not parameters or bitcasts), counted over the tiny model's layers.
    (With int8 weights the dots become kernel calls and the count stays within one.)"""
    model = make_config("tiny", []).model
    params = unstack_layers(init_params(model, jax.random.key(0)))
    cache = DenseKVCache.create(model, 1, 32, "float32")
    step = jax.jit(lambda p, t, pos, c: forward(p, t, pos, model, cache=c))
    one = jnp.zeros((1, 1), jnp.int32)
    text = step.lower(params, one, one + 31, cache).compile().as_text()
    entry = text[text.index("ENTRY"):].split("\n}\n")[0].splitlines()[1:]
    opcodes = [m.group(1) for line in entry if (m := re.search(r"= \S+ ([\w-]+)\(", line))]
    launched = sum(op not in ("parameter", "constant", "bitcast", "tuple",
                              "get-tuple-element") for op in opcodes)
    per_layer = (launched - OPS_OUTSIDE_LAYERS) / model.n_layers
    assert abs(per_layer - DECODE_OPS_PER_LAYER) <= 0.15 * DECODE_OPS_PER_LAYER, per_layer


def _call(target, operands, results, seconds_key):
    return {"target": target, "operands": operands, "results": results, "attrs": {},
            "flops": 2e9 if "matmul" in target else 0.0, "bytes": 1e6, "key": seconds_key}


def test_train_kernel_prediction_is_its_calls_measured_times_and_fusion_bytes():
    """A CPU bf16 step: each kernel call at its measured seconds, in the term of its kind
    (the head's matmuls by the vocabulary dimension), XLA's bytes at the fusion rate, every
    op's launch; nothing else."""
    config = make_config("shakespeare", []).model  # vocab 2048, dim 256
    v, d = config.vocab_size, config.dim
    calls = [_call("hpllm_bf16_matmul_bf16", [("bf16", (4096, d)), ("bf16", (d, 704))],
                   [("bf16", (4096, 704))], "up"),
             _call("hpllm_bf16_matmul_bf16", [("bf16", (4096, d)), ("bf16", (d, 704))],
                   [("bf16", (4096, 704))], "up"),  # the same shape again: its time again
             _call("hpllm_bf16_matmul_f32", [("bf16", (4096, d)), ("bf16", (v, d))],
                   [("f32", (4096, v))], "head"),
             _call("hpllm_attention_bwd", [("bf16", (32, 128, 8, 32))], [], "attn"),
             _call("hpllm_swiglu_fwd", [("bf16", (4096, 704))], [], "swiglu"),
             _call("hpllm_rms_norm_bwd", [("bf16", (4096, d))], [], "norm"),
             _call("hpllm_nll_fwd", [("f32", (4096, v))], [], "loss")]
    program = {"calls": calls, "xla_bytes": 3e8, "xla_ops": 150}
    seconds = {"up": 2e-3, "head": 5e-3, "attn": 7e-3, "swiglu": 1e-3, "norm": 4e-4,
               "loss": 3e-3}
    figures = {"calls": seconds, "fusion_bandwidth": 2e10}
    pred = train_kernel_prediction(config, Workload("train", 32, 128), CPU, program, figures)
    terms = {t.name: t for t in pred.terms}
    assert terms["weight matmuls"].seconds == pytest.approx(4e-3)
    assert terms["weight matmuls"].flops == 4e9 and terms["weight matmuls"].bytes == 2e6
    assert terms["output projection"].seconds == pytest.approx(5e-3)
    assert terms["attention"].seconds == pytest.approx(7e-3)
    assert terms["elementwise kernels"].seconds == pytest.approx(1.4e-3)
    assert terms["loss (softmax x-ent)"].seconds == pytest.approx(3e-3)
    assert terms["XLA fusions"].seconds == pytest.approx(3e8 / 2e10)
    assert terms["dispatch"].seconds == pytest.approx(157 * 5e-7 + 5e-5)
    assert pred.step_s == pytest.approx(sum(t.seconds for t in pred.terms))
    assert pred.model_flops == pytest.approx(train_flops_per_token(config, 128) * 4096)
    with pytest.raises(ValueError, match="no measured time for the kernel call up"):
        train_kernel_prediction(config, Workload("train", 32, 128), CPU, program,
                                {"calls": {}, "fusion_bandwidth": 2e10})


@pytest.mark.slow  # compiles a training step (~9 s)
def test_train_program_lists_the_steps_kernel_calls():
    """The compiled bf16 step of the tiny preset: three matmul calls per projection (forward,
    both gradients), the attention, SwiGLU, RMSNorm, RoPE and loss kernels each forward and
    backward, and XLA's other ops with their bytes."""
    from hpllm.kernels import cpu_matmul
    from hpllm.perf.measure import train_program

    if not cpu_matmul.available():
        pytest.skip("the CPU kernels are off here")
    config = make_config("tiny", ["--compute_dtype=bfloat16", "--batch_size=8",
                                  "--seq_len=64"])
    m = config.model
    program = train_program(config, Workload("train", 8, 64))
    targets = [c["target"] for c in program["calls"]]
    # per layer: q, k, v, o, gate, up, down; plus the tied head
    assert targets.count("hpllm_bf16_matmul_bf16") + targets.count(
        "hpllm_bf16_matmul_f32") == 3 * (7 * m.n_layers + 1)
    for kind, per_step in (("attention", m.n_layers), ("swiglu", m.n_layers),
                           ("rms_norm", 2 * m.n_layers + 1), ("rope", 2 * m.n_layers),
                           ("nll", 1)):
        assert targets.count(f"hpllm_{kind}_fwd") == targets.count(f"hpllm_{kind}_bwd") \
            == per_step, kind
    head = [c for c in program["calls"] if c["target"] == "hpllm_bf16_matmul_f32"]
    assert head[0]["flops"] == 2 * 8 * 64 * m.dim * m.vocab_size
    assert program["xla_ops"] > 0 and program["xla_bytes"] > 0
    assert all(c["key"].startswith(c["target"] + "(") for c in program["calls"])
