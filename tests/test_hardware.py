"""Measured machine figures (`hpllm hw`) and the chip table lookup."""

import functools
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import pytest

from hpllm.config import ModelConfig
from hpllm.kernels import cpu_decoder, cpu_quant_matmul
from hpllm.perf import hardware
from known_hardware import write_known_figures


def test_bandwidth_measurements_are_positive_and_plausible():
    compiled = shutil.which("g++") is not None
    assert hardware.probe_method() == ("c++" if compiled else "numpy")
    for method in ("c++", "numpy") if compiled else ("numpy",):  # and the portable fallback
        read = hardware.measure_read_bandwidth(nbytes=64 * 2**20, repeats=2, method=method)
        copy = hardware.measure_copy_bandwidth(nbytes=32 * 2**20, repeats=2, method=method)
        assert 1e8 < read < 1e13 and 1e8 < copy < 1e13  # between 0.1 GB/s and 10 TB/s
    one = hardware.measure_read_bandwidth(nbytes=64 * 2**20, repeats=2, threads=1)
    assert 1e8 < one < 1e13
    with pytest.raises(ValueError, match="probe method"):
        hardware.measure_read_bandwidth(method="fortran")
    gather = hardware.measure_all_gather_bandwidth(nbytes=8 * 2**20, repeats=2)
    assert len(jax.local_devices()) == 8  # tests run with 8 simulated CPU devices
    assert gather is not None and math.isfinite(gather) and gather > 1e6


def test_measured_cpu_is_cached_per_machine_with_its_load(tmp_path, monkeypatch):
    monkeypatch.setenv("HPLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "load_average", lambda: (0.25, 0.5, 0.75))  # idle
    monkeypatch.setattr(hardware, "_UNCACHED", {})  # not what an earlier test measured busy
    for name, sizes in {"measure_matmul_flops": {"n": 256, "repeats": 2},  # small: quick
                        "measure_read_bandwidth": {"nbytes": 64 * 2**20, "repeats": 2},
                        "measure_copy_bandwidth": {"nbytes": 32 * 2**20, "repeats": 2},
                        "measure_matvec": {"nbytes": 16 * 2**20, "repeats": 2},
                        "measure_batched_flops": {"rows": (2, 8), "nbytes": 16 * 2**20},
                        "measure_matvec_seconds": {"sizes": (2**16, 2**18), "nbytes": 2**20,
                                                   "repeats": 1},
                        "measure_paged_attention": {"rows": (2,), "layers": 2, "repeats": 1},
                        "measure_decode_attention": {"layers": 2, "repeats": 1},
                        "measure_dispatch_overhead": {"ops": 16, "repeats": 2},
                        "measure_bf16_kernel_flops": {"n": 256, "repeats": 2},
                        "measure_all_gather_bandwidth": {"nbytes": 8 * 2**20, "repeats": 2}
                        }.items():
        monkeypatch.setattr(hardware, name, functools.partial(getattr(hardware, name), **sizes))
    chip = hardware.measured_cpu()
    entry = next(iter(json.loads((tmp_path / "hardware.json").read_text()).values()))
    assert {"read_bandwidth", "copy_bandwidth", "all_gather_bandwidth_8dev", "measured_at",
            *hardware.MATMUL_DTYPES} <= set(entry)
    assert entry["load_average"] == [0.25, 0.5, 0.75] and entry["busy"] is False
    assert entry["cores"] == hardware.cores()
    assert entry["probe"] == f"{hardware.probe_method()}, {hardware.cores()} threads"
    assert chip.hbm_bandwidth == entry["read_bandwidth"] and chip.peak("float32") > 1e9
    assert chip.peak("int8") == entry["int8"] and "at load 0.25" in chip.source
    assert chip.peak("bfloat16") == max(entry["bfloat16"], entry["float32"],
                                         entry["bfloat16_kernel"])
    assert chip.axis_bandwidth == entry["all_gather_bandwidth_8dev"] > 0
    assert chip.matvec_bandwidth == entry["matvec_bandwidth"] > 0
    assert chip.int8_matvec_bandwidth == entry["int8_matvec_bandwidth"]
    assert chip.matvec_dot_s == entry["matvec_dot_s"] >= 0
    assert set(chip.batched_flops["float32"]) == {"2", "8"}
    assert [b for b, _ in chip.matvec_seconds["float32"]] == [2**16, 2**18]
    assert set(chip.paged_attention_flops) == {"2"} and chip.decode_attention_flops > 0
    again = hardware.measured_cpu()  # from the cache: the same figures, not a new measurement
    assert again == chip


def test_busy_machine_is_measured_but_not_cached_unless_forced(tmp_path, monkeypatch):
    monkeypatch.setenv("HPLLM_CACHE", str(tmp_path))
    path = tmp_path / "hardware.json"
    fingerprint = hardware._cpu_fingerprint()
    # An entry of the old single-thread probe (no load recorded) is measured again.
    path.write_text(json.dumps({fingerprint: {"float32": 1.0, "read_bandwidth": 2e10}}))
    calls = []

    def fake_measure(n_devices, method="auto"):
        calls.append(n_devices)
        load = 1.9 * hardware.cores()
        return {"read_bandwidth": 3e10 + len(calls), "load_average": [load, load, load],
                "busy": hardware.is_busy(load, hardware.cores()), "cores": hardware.cores(),
                "probe_version": hardware.PROBE_VERSION,
                "all_gather_bandwidth_8dev": 1e9}

    monkeypatch.setattr(hardware, "measure_cpu", fake_measure)
    monkeypatch.setattr(hardware, "_UNCACHED", {})
    lines = []
    busy = hardware.cpu_figures(log=lines.append)
    assert busy["cached"] is False and busy["read_bandwidth"] == 3e10 + 1
    assert len(lines) == 1 and "not caching" in lines[0] and "--force" in lines[0]
    assert json.loads(path.read_text())[fingerprint]["read_bandwidth"] == 2e10  # untouched
    assert hardware.cpu_figures(log=lines.append)["read_bandwidth"] == 3e10 + 1
    assert len(calls) == 1  # the same process reuses its uncached measurement
    forced = hardware.cpu_figures(force=True, log=lines.append)
    assert forced["cached"] is True and len(calls) == 2
    assert json.loads(path.read_text())[fingerprint]["read_bandwidth"] == 3e10 + 2
    assert hardware.cpu_figures()["read_bandwidth"] == 3e10 + 2 and len(calls) == 2
    assert hardware.is_busy(1.01, 2) and not hardware.is_busy(1.0, 2)


def test_probe_6_entry_gains_only_the_bf16_kernel_peak(tmp_path, monkeypatch):
    """A cached entry of the previous probe is kept and completed with the kernel's peak,
    which becomes the bf16 peak (MFU's); busy, it is not cached unless forced."""
    monkeypatch.setenv("HPLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_UNCACHED", {})
    write_known_figures(tmp_path, len(jax.local_devices()), probe_version=6)
    monkeypatch.setattr(hardware, "measure_cpu", lambda *a, **k: pytest.fail("full probe"))
    monkeypatch.setattr(hardware, "measure_bf16_kernel_flops", lambda: 9e11)
    monkeypatch.setattr(hardware, "load_average", lambda: (5.0, 5.0, 5.0))  # busy
    lines = []
    busy = hardware.cpu_figures(log=lines.append)
    assert busy["cached"] is False and busy["bfloat16_kernel"] == 9e11 and len(lines) == 1
    assert json.loads((tmp_path / "hardware.json").read_text())[
        hardware._cpu_fingerprint()]["probe_version"] == 6  # untouched
    monkeypatch.setattr(hardware, "load_average", lambda: (0.1, 0.1, 0.1))
    entry = hardware.cpu_figures(force=True)
    assert entry["cached"] is True and entry["probe_version"] == hardware.PROBE_VERSION
    assert entry["read_bandwidth"] == 6e10 and entry["kernel_load_average"] == [0.1] * 3
    assert hardware.measured_cpu().peak("bfloat16") == 9e11


def test_dot_chains_at_one_and_several_rows():
    """The XLA mat-vec chain and the int8 kernel's: weight bytes/s at one row, FLOP/s at a
    few (a batched decode step's matmul rate), all between 0.1 GB/s (or GFLOP/s) and 10 T."""
    rate, per_dot = hardware.measure_matvec(nbytes=16 * 2**20, repeats=2)
    assert 1e8 < rate < 1e13 and 0 <= per_dot < 1e-2
    rates = hardware.measure_batched_flops(rows=(2, 8), nbytes=16 * 2**20)
    assert set(rates) == {"2", "8"} and all(1e8 < r < 1e13 for r in rates.values())
    int8, int8_dot = hardware.measure_matvec(nbytes=16 * 2**20, repeats=2, int8=True)
    int8_rates = hardware.measure_batched_flops(int8=True, rows=(8,), nbytes=16 * 2**20)
    if cpu_quant_matmul.available():
        assert 1e8 < int8 < 1e13 and 1e8 < int8_rates["8"] < 1e13 and 0 <= int8_dot < 1e-2
    else:
        assert int8 == int8_dot == 0 and int8_rates == {}


def test_one_row_dot_table_and_paged_attention_rate():
    """Seconds per one-row dot by matrix size (square, K a multiple of 64: the bytes are
    K^2 x 4 for float32, K^2 + 4K for int8 codes and scales), and the FLOP/s of the
    engine's online paged attention."""
    table = hardware.measure_matvec_seconds(sizes=(2**16, 2**20), nbytes=2**21, repeats=2)
    assert [b for b, _ in table] == [128**2 * 4, 512**2 * 4]
    assert all(1e-8 < s < 1e-1 for _, s in table)
    int8 = hardware.measure_matvec_seconds(int8=True, sizes=(2**18,), nbytes=2**20, repeats=1)
    assert int8 == [] if not cpu_quant_matmul.available() else (
        int8[0][0] == 512**2 + 4 * 512 and 1e-8 < int8[0][1] < 1e-1)
    rates = hardware.measure_paged_attention(rows=(2, 4), layers=2, repeats=2)
    assert set(rates) == {"2", "4"} and all(1e6 < r < 1e13 for r in rates.values())
    assert 1e6 < hardware.measure_decode_attention(keys=64, layers=2, repeats=2) < 1e13


def test_decoder_kernel_figures_are_timed_on_the_kernel():
    """measure_decoder times the fused decoder kernel itself: per format the bytes/s of its
    weights and FLOP/s by tokens, attention FLOP/s and fixed costs by tokens; the bytes it
    counts are those of the matrices prepare() lays out (odd sizes, untied-free: tied head)."""
    config = ModelConfig(vocab_size=101, dim=96, n_layers=3, n_heads=3, n_kv_heads=1,
                         ffn_dim=160, max_seq_len=64)
    for fmt in hardware.DECODER_FORMATS:
        weights = cpu_decoder.prepare(hardware._probe_params(config, fmt), config)
        matrices = [weights.wqkv, weights.wo, weights.wgu, weights.wdown, weights.head]
        scales = [weights.wqkv_scale, weights.wo_scale, weights.wgu_scale,
                  weights.wdown_scale, weights.head_scale]
        nbytes = sum(a.nbytes for a in matrices) + (fmt == "int8") * sum(a.nbytes
                                                                        for a in scales)
        assert hardware.decoder_weight_bytes(config, fmt) == (
            nbytes, sum(a.size for a in matrices))
    figures = hardware.measure_decoder(rows=(1, 4), stream_bytes=2**20, repeats=2)
    if not cpu_decoder.available():
        assert figures == {}
        return
    assert figures["source"] == hardware.decoder_source_id()
    for fmt in hardware.DECODER_FORMATS:
        assert 1e8 < figures["stream_bandwidth"][fmt] < 1e13
        assert set(figures["matmul_flops"][fmt]) == {"1", "4"}
        assert all(1e8 < r < 1e14 for r in figures["matmul_flops"][fmt].values())
    # a row whose difference was lost in noise is left out, not a made-up rate
    assert figures["attention_flops"] and set(figures["attention_flops"]) <= {"1", "4"}
    assert all(1e6 < r < 1e14 for r in figures["attention_flops"].values())
    assert all(0 <= s < 1e-2 for s in figures["layer_s"].values())
    assert all(0 <= s < 1 for s in figures["call_s"].values())


def test_decoder_figures_are_cached_per_kernel_source(tmp_path, monkeypatch):
    """Measured only when asked for, cached in the CPU's entry beside the rest (kept when
    that is measured again), measured again when the kernel's sources change; busy, kept
    for this process only unless forced."""
    monkeypatch.setenv("HPLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_UNCACHED", {})
    write_known_figures(tmp_path, len(jax.local_devices()), decoder={})
    calls = []
    monkeypatch.setattr(hardware, "measure_decoder", lambda: calls.append(1) or {
        "source": hardware.decoder_source_id(), "stream_bandwidth": {"int8": len(calls)}})
    monkeypatch.setattr(hardware, "load_average", lambda: (5.0, 5.0, 5.0))  # busy
    assert hardware.measured_cpu().decoder == {} and not calls  # not measured unasked
    lines = []
    busy = hardware.decoder_figures(log=lines.append)
    assert busy["stream_bandwidth"] == {"int8": 1} and busy["busy"] is True
    assert len(lines) == 1 and "hpllm hw --decoder --force" in lines[0]
    assert hardware.decoder_figures(log=lines.append) == busy and len(calls) == 1
    forced = hardware.decoder_figures(force=True)
    assert forced["stream_bandwidth"] == {"int8": 2} and len(calls) == 2
    entry = json.loads((tmp_path / "hardware.json").read_text())[hardware._cpu_fingerprint()]
    assert entry["decoder"] == forced and entry["read_bandwidth"] == 6e10
    assert forced["version"] == hardware.DECODER_PROBE_VERSION
    assert hardware.decoder_figures() == forced and len(calls) == 2  # from the cache
    assert hardware.measured_cpu().decoder == forced
    monkeypatch.setattr(hardware, "decoder_source_id", lambda: "edited")  # the kernel changed
    assert hardware.measured_cpu().decoder == {}
    assert hardware.decoder_figures(force=True)["stream_bandwidth"] == {"int8": 3}
    monkeypatch.setattr(hardware, "measure_cpu", lambda n, method="auto": {
        "probe_version": hardware.PROBE_VERSION, "busy": False, "cores": 2,
        "load_average": [0.1] * 3, "all_gather_bandwidth_8dev": 1.0})
    hardware.cpu_figures(refresh=True)  # the rest measured again: the decoder's kept
    entry = json.loads((tmp_path / "hardware.json").read_text())[hardware._cpu_fingerprint()]
    assert entry["decoder"]["stream_bandwidth"] == {"int8": 3} and len(calls) == 3


def test_table_lookup_by_device_kind():
    assert hardware.lookup("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"
    assert hardware.lookup("TPU v5 lite").name == "TPU v5e"
    assert hardware.lookup("TPU v4").hbm_bytes == 32e9
    assert hardware.lookup("AMD EPYC 9R45") is None
    for chip in hardware.CHIPS.values():  # every accelerator entry is complete
        assert chip.peak("bfloat16") > 1e14 and chip.hbm_bandwidth > 5e11
        assert chip.axis_bandwidth >= chip.link_bandwidth and chip.ici_bandwidth > 0
        assert chip.tdp_watts == 0 or 100 <= chip.tdp_watts <= 1500  # 0: not published
    assert hardware.CHIPS["a100"].tdp_watts == 400  # the course table's A100-80GB power
    assert hardware.lookup("NVIDIA A10G").hbm_bandwidth == 600e9


def test_cli_hw_json_from_the_cache(tmp_path):
    write_known_figures(tmp_path, 1, read_bandwidth=6.7e10, load_average=[0.1, 0.2, 0.3])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
    out = subprocess.run([sys.executable, "-m", "hpllm.cli", "hw", "--json",
                          str(tmp_path / "hw.json")], capture_output=True, text=True,
                         timeout=120, env=dict(env, HPLLM_CACHE=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert "at load 0.10/0.20/0.30" in out.stdout and "read 67.0 GB/s" in out.stdout
    assert "decoder kernel: weights float32 30.0 GB/s, int8 30.0 GB/s" in out.stdout
    data = json.loads((tmp_path / "hw.json").read_text())
    assert data["read_bandwidth"] == 6.7e10 and data["copy_bandwidth"] == 5e10
    assert data["peak_flops"] == {"float32": 4e11, "bfloat16": 3e11, "float16": 3e11,
                                  "int8": 7e11}
    assert data["cached"] is True and data["load_average"] == [0.1, 0.2, 0.3]


def test_train_figures_time_each_new_call_once_and_cache_per_kernel_source(tmp_path,
                                                                           monkeypatch):
    """Kernel calls timed alone (the real measurement on one small call), cached by their
    key with the fusion probe's rate; only calls not yet measured are timed; busy, kept
    for this process only; stale when the kernels' sources change."""
    from hpllm.kernels import cpu_matmul

    call = {"target": "hpllm_bf16_matmul_bf16", "operands": [("bf16", (300, 64)),
                                                             ("bf16", (64, 96))],
            "results": [("bf16", (300, 96))], "attrs": {"trans_a": 0, "trans_b": 0}}
    if cpu_matmul.available():  # the real timing of a call as the step makes it (the
        # session's kernel build, before this test's own cache)
        assert 0 < hardware.measure_kernel_call(call, repeats=2) < 1.0
    monkeypatch.setenv("HPLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_UNCACHED", {})
    write_known_figures(tmp_path, len(jax.local_devices()))
    timed = []
    monkeypatch.setattr(hardware, "measure_kernel_call",
                        lambda c, per_call=0.0: timed.append(c["operands"][0][1]) or 1e-3)
    monkeypatch.setattr(hardware, "measure_fusion_bandwidth", lambda: 2e10)
    monkeypatch.setattr(hardware, "jit_call_seconds", lambda: 5e-5)
    monkeypatch.setattr(hardware, "load_average", lambda: (5.0, 5.0, 5.0))  # busy
    busy = hardware.train_figures([call, call], log=lambda line: None)
    key = hardware.call_key(call)
    assert key == ("hpllm_bf16_matmul_bf16(bf16[300, 64],bf16[64, 96])"
                   "{trans_a=0,trans_b=0}")
    assert busy["calls"] == {key: 1e-3} and busy["busy"] and len(timed) == 1
    assert not (tmp_path / "hardware.json").read_text().count('"train"')
    monkeypatch.setattr(hardware, "load_average", lambda: (0.1, 0.1, 0.1))
    other = dict(call, operands=[("bf16", (512, 64)), ("bf16", (64, 96))])
    figures = hardware.train_figures([call, other], force=True)
    assert len(timed) == 2 and set(figures["calls"]) == {key, hardware.call_key(other)}
    entry = json.loads((tmp_path / "hardware.json").read_text())[hardware._cpu_fingerprint()]
    assert entry["train"]["calls"] == figures["calls"]
    assert entry["train"]["fusion_bandwidth"] == 2e10
    assert hardware.train_figures([other]) == figures and len(timed) == 2  # from the cache
    monkeypatch.setattr(hardware, "train_source_id", lambda: "edited")  # kernels changed
    hardware.train_figures([other], force=True)
    assert len(timed) == 3
