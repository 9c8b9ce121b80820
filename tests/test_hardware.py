"""Measured machine figures (`hpllm hw`) and the chip table lookup."""

import json
import math

import jax

from hpllm.perf import hardware


def test_bandwidth_measurements_are_positive_and_plausible():
    read = hardware.measure_read_bandwidth(nbytes=64 * 2**20, repeats=2)
    assert 1e8 < read < 1e13  # between 0.1 GB/s and 10 TB/s
    gather = hardware.measure_all_gather_bandwidth(nbytes=8 * 2**20, repeats=2)
    assert len(jax.local_devices()) == 8  # tests run with 8 simulated CPU devices
    assert gather is not None and math.isfinite(gather) and gather > 1e6


def test_measured_cpu_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("HPLLM_CACHE", str(tmp_path))
    chip = hardware.measured_cpu()
    entry = next(iter(json.loads((tmp_path / "hardware.json").read_text()).values()))
    assert {"float32", "bfloat16", "read_bandwidth", "copy_bandwidth",
            "all_gather_bandwidth_8dev"} <= set(entry)
    assert chip.hbm_bandwidth == entry["read_bandwidth"] and chip.peak("float32") > 1e9
    assert chip.axis_bandwidth == entry["all_gather_bandwidth_8dev"] > 0
    again = hardware.measured_cpu()  # from the cache: the same figures, not a new measurement
    assert again == chip


def test_table_lookup_by_device_kind():
    assert hardware.lookup("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"
    assert hardware.lookup("TPU v5 lite").name == "TPU v5e"
    assert hardware.lookup("TPU v4").hbm_bytes == 32e9
    assert hardware.lookup("AMD EPYC 9R45") is None
    for chip in hardware.CHIPS.values():  # every accelerator entry is complete
        assert chip.peak("bfloat16") > 1e14 and chip.hbm_bandwidth > 5e11
        assert chip.axis_bandwidth >= chip.link_bandwidth and chip.ici_bandwidth > 0
