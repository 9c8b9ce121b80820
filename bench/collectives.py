"""Ring collectives vs XLA's built-ins: time, achieved bandwidth, and the ring model's prediction.

    python bench/collectives.py [--devices 8] [--sizes 16K,256K,4M,32M] [--json out.json]

Runs on simulated CPU devices unless real ones exist (it sets
--xla_force_host_platform_device_count when JAX has not started yet). For each collective,
implementation and per-device message size it prints the median time, the algorithm
bandwidth (bytes of the per-device result / time) and the bus bandwidth (what each link
carried: the nccl-tests convention, x (n-1)/n, x 2(n-1)/n for all-reduce), the prediction of
the ring model

    all-gather / reduce-scatter:  (n-1) * (hop latency + (S/n) / link bandwidth)
    all-reduce:                   twice that;   bidirectional: half the bytes per hop
    (+ the fixed cost of launching a jitted program)

with S the full (gathered) array in bytes, and the time relative to XLA's collective in the
same run. Hop latency and launch overhead are measured here from chains of ppermutes; the
link bandwidth comes from the hardware table for accelerators, and is measured the same way
for simulated CPU devices, whose "links" are memory copies inside one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    n_arg = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "8"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n_arg}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hpllm.parallel.collectives import IMPLEMENTATIONS, sharded_collective  # noqa: E402
from hpllm.perf.hardware import lookup, time_calls  # noqa: E402


def median_time(fn, x, repeats: int) -> float:
    return float(np.median(time_calls(lambda: fn(x), repeats)))


def measure_link(mesh, repeats: int) -> tuple[float, float, float]:
    """(link bytes/s, hop latency s, call overhead s) from chains of 1 and 8 ring hops with a
    tiny and a 4 MiB message per device: slopes separate the per-hop cost from the cost of
    launching the program at all."""
    n = mesh.devices.size

    def chain(hops):
        def body(x):
            for _ in range(hops):
                x = jax.lax.ppermute(x, "x", [(i, (i + 1) % n) for i in range(n)]) + 1
            return x
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))

    big_bytes = 4 * 2**20
    t = {(size, hops): median_time(chain(hops), jnp.zeros((n * size // 4,), jnp.float32),
                                   repeats)
         for size in (4, big_bytes) for hops in (1, 8)}
    latency = max((t[4, 8] - t[4, 1]) / 7, 1e-7)
    per_big_hop = (t[big_bytes, 8] - t[big_bytes, 1]) / 7
    bandwidth = big_bytes / max(per_big_hop - latency, 1e-9)
    return bandwidth, latency, max(t[4, 1] - latency, 0.0)


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--sizes", default="16K,256K,4M,32M",
                        help="bytes of the gathered / reduced array, S")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    n = min(args.devices, jax.device_count())
    mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])
    device = jax.devices()[0]
    chip = lookup(getattr(device, "device_kind", "")) if device.platform != "cpu" else None
    link_bw, hop_latency, overhead = measure_link(mesh, args.repeats)
    source = "measured ppermute chains"
    if chip is not None:  # the datasheet figure per link; latency stays measured
        link_bw, source = chip.link_bandwidth, f"{chip.name} table, latency measured"
    print(f"{n} x {device.platform} devices ({device.device_kind}); link {link_bw / 1e9:.2f} "
          f"GB/s, hop latency {hop_latency * 1e6:.1f} us, call overhead "
          f"{overhead * 1e6:.0f} us ({source})")
    print(f"{'collective':<15}{'impl':<11}{'S':>8}{'time us':>10}{'algbw GB/s':>11}"
          f"{'busbw GB/s':>11}{'pred us':>9}{'meas/pred':>10}{'vs xla':>8}")
    rows = []
    for kind in IMPLEMENTATIONS:
        for size in [parse_size(s) for s in args.sizes.split(",")]:
            elems = max(size // 4 // (2 * n * n), 1) * 2 * n * n  # divisible for every impl
            nbytes = elems * 4
            # Per-device input: all-gather takes S/n per device; the reductions take S each.
            x = jnp.ones((elems if kind == "all_gather" else elems * n,), jnp.float32)
            hops = (n - 1) * (2 if kind == "all_reduce" else 1)
            baseline = None
            for impl in ["xla", "ring", "ring_bidir"]:
                fn = sharded_collective(kind, impl, mesh, "x")
                t = median_time(fn, x, args.repeats)
                baseline = baseline or t
                per_hop = nbytes / n / (2 if impl == "ring_bidir" else 1)
                predicted = overhead + hops * (hop_latency + per_hop / link_bw)
                algbw = nbytes / t  # nccl-tests: S over time, S the full array
                factor = (n - 1) / n * (2 if kind == "all_reduce" else 1)
                row = {"collective": kind, "impl": impl, "devices": n, "bytes": nbytes,
                       "time_s": t, "algbw": algbw, "busbw": algbw * factor,
                       "predicted_s": predicted, "vs_xla": t / baseline}
                rows.append(row)
                print(f"{kind:<15}{impl:<11}{nbytes / 2**10:>7.0f}K{t * 1e6:>10.1f}"
                      f"{algbw / 1e9:>11.2f}{row['busbw'] / 1e9:>11.2f}{predicted * 1e6:>9.1f}"
                      f"{t / predicted:>10.2f}{t / baseline:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": n, "platform": device.platform, "link_bandwidth": link_bw,
                       "hop_latency": hop_latency, "call_overhead": overhead, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
