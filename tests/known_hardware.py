"""Made-up figures for this CPU in an $HPLLM_CACHE, so a command that needs them (the
roofline, `hpllm hw`) reads them instead of measuring: fast, and the same on any load."""

import json

from hpllm.perf import hardware


def write_known_figures(cache, n_devices: int, **overrides) -> dict:
    """Writes cache/hardware.json with an idle machine's figures (as `overrides` change
    them) for a process with `n_devices` JAX devices; returns the figures."""
    figures = {"float32": 4e11, "bfloat16": 3e11, "float16": 3e11, "int8": 7e11,
               "read_bandwidth": 6e10, "copy_bandwidth": 5e10, "matvec_bandwidth": 3e10,
               "op_overhead_s": 5e-7, "call_overhead_s": 3e-5, "int8_matvec_bandwidth": 4e10,
               "matvec_dot_s": 2e-6, "int8_matvec_dot_s": 1e-5,
               "batched_flops": {"float32": {"8": 1e11, "32": 2e11},
                                 "int8": {"8": 8e10, "32": 1.5e11}},
               "matvec_seconds": {"float32": [[2.6e5, 1e-5], [4.2e6, 1.4e-4]],
                                  "int8": [[1.1e5, 6e-6], [4.2e6, 1.1e-4]]},
               "paged_attention_flops": {"8": 5e9, "32": 8e9},
               "decode_attention_flops": 9e9,
               "decoder": {"source": hardware.decoder_source_id(), "threads": 2,
                           "version": hardware.DECODER_PROBE_VERSION, "busy": False,
                           "load_average": [0.0, 0.0, 0.0],
                           "stream_bandwidth": {"float32": 3e10, "int8": 3e10},
                           "matmul_flops": {"float32": {"1": 1.5e10, "8": 9e10, "32": 1.5e11},
                                            "int8": {"1": 6e10, "8": 1.2e11, "32": 2e11}},
                           "attention_flops": {"1": 2e10, "8": 2.5e10, "32": 3e10},
                           "layer_s": {"1": 5e-6, "8": 8e-6, "32": 2e-5},
                           "call_s": {"1": 6e-5, "8": 8e-5, "32": 1e-4}},
               "probe": "c++, 2 threads",
               "probe_version": hardware.PROBE_VERSION, "cores": 2, "busy": False,
               "load_average": [0.0, 0.0, 0.0], "measured_at": "2026-01-01T00:00:00",
               f"all_gather_bandwidth_{n_devices}dev": 1e9, **overrides}
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "hardware.json").write_text(json.dumps({hardware._cpu_fingerprint(): figures}))
    return figures
