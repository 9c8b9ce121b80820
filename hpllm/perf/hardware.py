"""What the hardware allows: a table of accelerator specs, and measured figures for CPUs.

MFU and the roofline need a peak. For accelerators the vendor's dense (no-sparsity) figure is
the convention; a CPU has no honest datasheet number for XLA, so we measure a large jitted
matmul once per machine and dtype and cache the result under ~/.cache/hpllm.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from hpllm.cache import cache_dir


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: dict  # dtype name -> dense FLOP/s per device
    hbm_bytes: float  # memory capacity per device
    hbm_bandwidth: float  # bytes/s per device (reading; on CPU a measured large read)
    link_bandwidth: float  # bytes/s per device, one direction, per interconnect link
    source: str
    measured: bool = False
    # What a ring collective over one mesh axis can send per device (bytes/s): both
    # directions of a torus axis on TPU, the NVLink injection bandwidth on GPU.
    axis_bandwidth: float = 0.0
    # All interconnect bandwidth of a device, both directions of every link: the "W_ici" of
    # the FSDP/tensor-parallel compute-bound conditions.
    ici_bandwidth: float = 0.0

    def peak(self, dtype: str = "bfloat16") -> float:
        return self.peak_flops.get(dtype) or self.peak_flops["bfloat16"]


_T, _G = 1e12, 1e9
# Dense figures (no 2:4 sparsity); memory in decimal GB as the datasheets give it. Sources:
# vendor datasheets; TPU link figures as tabulated in "How to Scale Your Model" (Austin et
# al., 2025): 45 GB/s (v4, v5e) or 90 GB/s (v5p, v6e) one direction per ICI link, a 3D torus
# on v4/v5p (6 links) and a 2D torus on v5e/v6e (4 links).
CHIPS = {
    "tpu-v4": Chip("TPU v4", {"bfloat16": 275 * _T, "int8": 275 * _T}, 32 * _G, 1228 * _G,
                   45 * _G, "cloud.google.com/tpu/docs/v4", axis_bandwidth=90 * _G,
                   ici_bandwidth=270 * _G),
    "tpu-v5e": Chip("TPU v5e", {"bfloat16": 197 * _T, "int8": 394 * _T}, 16 * _G, 819 * _G,
                    45 * _G, "cloud.google.com/tpu/docs/v5e", axis_bandwidth=90 * _G,
                    ici_bandwidth=180 * _G),
    "tpu-v5p": Chip("TPU v5p", {"bfloat16": 459 * _T, "int8": 918 * _T}, 95 * _G, 2765 * _G,
                    90 * _G, "cloud.google.com/tpu/docs/v5p", axis_bandwidth=180 * _G,
                    ici_bandwidth=540 * _G),
    "tpu-v6e": Chip("TPU v6e", {"bfloat16": 918 * _T, "int8": 1836 * _T}, 32 * _G, 1640 * _G,
                    90 * _G, "cloud.google.com/tpu/docs/v6e", axis_bandwidth=180 * _G,
                    ici_bandwidth=360 * _G),
    "a100": Chip("NVIDIA A100 SXM 80GB", {"bfloat16": 312 * _T, "float16": 312 * _T,
                                          "float32": 19.5 * _T, "tf32": 156 * _T},
                 80 * _G, 2039 * _G, 300 * _G, "NVIDIA A100 datasheet (NVLink 600 GB/s bidir)",
                 axis_bandwidth=300 * _G, ici_bandwidth=600 * _G),
    "h100": Chip("NVIDIA H100 SXM", {"bfloat16": 989 * _T, "float16": 989 * _T,
                                     "float32": 67 * _T, "float8": 1979 * _T},
                 80 * _G, 3350 * _G, 450 * _G, "NVIDIA H100 datasheet (NVLink 900 GB/s bidir)",
                 axis_bandwidth=450 * _G, ici_bandwidth=900 * _G),
    "h200": Chip("NVIDIA H200 SXM", {"bfloat16": 989 * _T, "float16": 989 * _T,
                                     "float32": 67 * _T, "float8": 1979 * _T},
                 141 * _G, 4800 * _G, 450 * _G, "NVIDIA H200 datasheet (NVLink 900 GB/s bidir)",
                 axis_bandwidth=450 * _G, ici_bandwidth=900 * _G),
    "b200": Chip("NVIDIA B200", {"bfloat16": 2250 * _T, "float16": 2250 * _T,
                                 "float32": 75 * _T, "float8": 4500 * _T},
                 180 * _G, 7700 * _G, 900 * _G,
                 "NVIDIA HGX B200 datasheet (NVLink5 1.8 TB/s bidir)",
                 axis_bandwidth=900 * _G, ici_bandwidth=1800 * _G),
}

# device_kind strings as JAX reports them -> table key (first substring match wins).
_KIND_PATTERNS = [("v5 lite", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v5p", "tpu-v5p"), ("v5", "tpu-v5p"),
                  ("v6", "tpu-v6e"), ("v4", "tpu-v4"), ("a100", "a100"), ("h100", "h100"),
                  ("h200", "h200"), ("b200", "b200"), ("gh200", "h200")]


def lookup(device_kind: str) -> Chip | None:
    kind = device_kind.lower()
    for pattern, key in _KIND_PATTERNS:
        if pattern in kind:
            return CHIPS[key]
    return None


def time_calls(run, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `run()` (waited on), after one untimed call
    that compiles and warms up. Peaks take the best; workloads the median."""
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return times


def measure_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a jitted n×n×n matmul on the default device."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(jnp.matmul)
    return 2 * n**3 / min(time_calls(lambda: matmul(a, b), repeats))


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a jitted copy (read + write counted) of a donated buffer."""
    copy = jax.jit(lambda x: x * 1.0001, donate_argnums=0)  # donated: no fresh allocation
    x = [jnp.ones((nbytes // 4,), jnp.float32)]

    def run():
        x[0] = copy(x[0])
        return x[0]

    return 2 * nbytes / min(time_calls(run, repeats))


def measure_read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a jitted reduction over a large array: reading only, like a decode step
    streaming its weights (a copy also writes, and allocation makes fresh writes slower)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return nbytes / min(time_calls(lambda: total(x), repeats))


def measure_all_gather_bandwidth(nbytes: int = 64 * 2**20, repeats: int = 5) -> float | None:
    """Bus bandwidth (bytes each device receives per second, (n-1)/n of the gathered array)
    of jax.lax.all_gather over all local devices; None with a single device."""
    devices = jax.local_devices()
    n = len(devices)
    if n < 2:
        return None
    mesh = jax.sharding.Mesh(devices, ("d",))
    spec = jax.sharding.PartitionSpec("d")
    x = jax.device_put(jnp.ones((n, nbytes // 4 // n), jnp.float32),
                       jax.sharding.NamedSharding(mesh, spec))
    gather = jax.jit(jax.shard_map(lambda b: jax.lax.all_gather(b, "d", tiled=True), mesh=mesh,
                                   in_specs=spec, out_specs=spec))
    return (n - 1) / n * nbytes / min(time_calls(lambda: gather(x), repeats))


def _meminfo_bytes() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def _cpu_fingerprint() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}|{os.cpu_count()}cpu|jax{jax.__version__}"


def measured_cpu(refresh: bool = False) -> Chip:
    """This CPU's measured peaks (float32/bfloat16 matmul, copy bandwidth), cached per machine."""
    path = cache_dir() / "hardware.json"
    fingerprint = _cpu_fingerprint()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(fingerprint)
    n_devices = len(jax.local_devices())
    gather_key = f"all_gather_bandwidth_{n_devices}dev"
    if entry is None or refresh or "read_bandwidth" not in entry or (
            n_devices > 1 and gather_key not in entry):
        entry = {"float32": measure_matmul_flops("float32"),
                 "bfloat16": measure_matmul_flops("bfloat16"),
                 "copy_bandwidth": measure_copy_bandwidth(),
                 "read_bandwidth": measure_read_bandwidth(),
                 **{k: v for k, v in (entry or {}).items() if k.startswith("all_gather")},
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if n_devices > 1:
            entry[gather_key] = measure_all_gather_bandwidth()
        cached[fingerprint] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    # XLA:CPU runs the dots of a bf16 program as float32 XNNPACK fusions (converts around
    # them), which beat its standalone bf16 matmul: the profile showed bf16 training matmuls
    # at 1.4x the measured bf16 peak. The peak a bf16 program can reach is the better of the
    # two, and dividing by it keeps MFU from being inflated.
    low = max(entry["bfloat16"], entry["float32"])
    flops = {"float32": entry["float32"], "bfloat16": low, "float16": low}
    gather = entry.get(gather_key, 0.0)
    return Chip(f"CPU ({fingerprint.split('|')[0]})", flops, _meminfo_bytes(),
                entry["read_bandwidth"], gather, f"measured {entry['measured_at']}: jitted "
                f"2048^3 matmul, 512 MiB read (copy {entry['copy_bandwidth'] / 1e9:.1f} GB/s)"
                + (f", all-gather over {n_devices} devices" if gather else ""),
                measured=True, axis_bandwidth=gather, ici_bandwidth=gather)


def current_chip() -> Chip:
    """The chip of jax.devices()[0]: from the table, else measured (CPU or unknown)."""
    device = jax.devices()[0]
    chip = lookup(getattr(device, "device_kind", ""))
    if chip is not None and device.platform != "cpu":
        return chip
    return measured_cpu()
