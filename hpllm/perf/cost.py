"""What training and serving cost: GPU-hours, energy and emissions of a training run, and
dollars per million generated tokens on a rented instance.

Training energy is the LLaMA paper's (Touvron et al., 2023) arithmetic, which the course's
table reproduces: GPU-hours x the GPU's power x the data centre's PUE (1.1), and emissions
= energy x the grid's carbon intensity (0.385 kgCO2e/kWh, the US average it uses). The
GPU-hours come from a run's report, or from the 6·P·T training FLOPs of P parameters on T
tokens at a model FLOP utilisation of the chip's dense peak.

Serving: an instance's hourly price over the tokens it produces in an hour. Decode is
memory-bound: every step reads all the weights once, plus each sequence's KV cache, so a
step of `batch` sequences takes (weights + batch x KV) / the instance's total memory
bandwidth, or 2·P·batch FLOPs at peak if that is longer (the roofline of a decode step,
communication between the GPUs left out).
"""

from __future__ import annotations

import dataclasses

from hpllm.config import ConfigError
from hpllm.perf import sizing
from hpllm.perf.hardware import CHIPS, Chip

PUE = 1.1  # LLaMA paper: power usage effectiveness of the data centre
GRID_KG_PER_KWH = 0.385  # LLaMA paper: US national average carbon intensity, kgCO2e/kWh
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}


class CostError(ConfigError):
    """Inputs a cost cannot be computed from; says which (the CLI prints it in one line)."""


@dataclasses.dataclass(frozen=True)
class TrainCost:
    gpu_hours: float
    energy_mwh: float
    tco2e: float

    def __str__(self) -> str:
        return (f"{self.gpu_hours:,.0f} GPU-hours, {self.energy_mwh:.1f} MWh, "
                f"{self.tco2e:.1f} tCO2e")


def train_cost(gpu_hours: float, watts: float, pue: float = PUE,
               grid: float = GRID_KG_PER_KWH) -> TrainCost:
    """Energy (MWh, at the wall: x PUE) and emissions (tCO2e) of `gpu_hours` at `watts`."""
    if gpu_hours <= 0 or watts <= 0 or pue < 1 or grid < 0:
        raise CostError("need GPU-hours > 0, watts > 0, PUE >= 1 and grid intensity >= 0")
    mwh = gpu_hours * watts * pue / 1e6
    return TrainCost(gpu_hours, mwh, mwh * grid)  # MWh x kg/kWh = t


def training_flops(params: float, tokens: float) -> float:
    """6·P·T: forward (2 FLOPs per parameter and token) and backward (4)."""
    return 6 * params * tokens


def gpu_hours_for(params: float, tokens: float, chip: Chip, mfu: float,
                  dtype: str = "bfloat16") -> float:
    """GPU-hours to train P parameters on T tokens at `mfu` of the chip's dense peak."""
    if params <= 0 or tokens <= 0 or not 0 < mfu <= 1:
        raise CostError("need --params > 0, --tokens > 0 and 0 < --mfu <= 1")
    return training_flops(params, tokens) / (chip.peak(dtype) * mfu) / 3600


def chip_watts(chip: Chip, watts: float = 0.0) -> float:
    """`watts` if given, else the chip's TDP from the table."""
    if watts:
        return watts
    if not chip.tdp_watts:
        raise CostError(f"{chip.name} has no published TDP in the chip table: pass --watts")
    return chip.tdp_watts


# The course's table (LLaMA paper, Table 15): A100-80GB at 400 W. Tests reproduce it.
COURSE_TRAINING = {  # model: (GPU-hours, MWh, tCO2e) as reported
    "OPT-175B": (809_472, 356, 137), "BLOOM-175B": (1_082_880, 475, 183),
    "LLaMA-7B": (82_432, 36, 14), "LLaMA-13B": (135_168, 59, 23),
    "LLaMA-33B": (530_432, 233, 90), "LLaMA-65B": (1_022_362, 449, 173)}


# ------------------------------------------------------------------------------ serving

@dataclasses.dataclass(frozen=True)
class Instance:
    name: str
    dollars_per_hour: float
    gpus: int
    chip: str  # key of hardware.CHIPS


# On-demand prices as the course text tabulates them (../shared/course/003: AWS g5).
INSTANCES = {"g5.12xlarge": Instance("g5.12xlarge", 6.3317, 4, "a10g"),
             "g5.48xlarge": Instance("g5.48xlarge", 18.1823, 8, "a10g")}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What serving memory depends on: parameters and the attention's KV layout."""
    params: float
    n_layers: int
    n_kv_heads: int
    head_dim: int
    source: str


# Public configurations (config.json on the Hugging Face hub). Falcon-7B is multi-query (one
# KV head for 71 query heads); Falcon-40B keeps 8 KV groups for 128 query heads.
MODELS = {
    "bloom-176b": ModelShape(176e9, 70, 112, 128, "bigscience/bloom: 70 layers, 112 heads "
                             "of 128"),
    "falcon-7b": ModelShape(7e9, 32, 1, 64, "tiiuae/falcon-7b: 32 layers, 71 query heads "
                            "of 64, multi-query (1 KV head)"),
    "falcon-40b": ModelShape(40e9, 60, 8, 64, "tiiuae/falcon-40b: 60 layers, 128 query "
                             "heads of 64, 8 KV groups"),
}


# The course's "K,V-cache size for a 2.048 context" column (003, Falcon table).
COURSE_KV_2048 = {"falcon-7b": 240e6, "falcon-40b": 20e6}
COURSE_KV_NOTE = ("the course's table gives Falcon-7B 240 MB and Falcon-40B 20 MB: the two "
                  "cells are swapped. Falcon-40B's 8 KV groups hold exactly 240 MiB (252 MB) "
                  "in bf16; Falcon-7B's one KV head (multi-query) holds 16 MiB (16.8 MB), the "
                  "table's ~20 MB")


def bytes_per_value(dtype: str) -> float:
    if dtype not in _BYTES:
        raise CostError(f"unknown dtype {dtype!r}; known: {', '.join(_BYTES)}")
    return _BYTES[dtype]


def weight_bytes(params: float, dtype: str = "bfloat16") -> float:
    """Bytes of the weights alone: BLOOM-176B in bf16 is 176e9 x 2 = 352 GB."""
    return params * bytes_per_value(dtype)


def kv_bytes(model: ModelShape, tokens: int, dtype: str = "bfloat16") -> float:
    """The KV cache of one `tokens`-long sequence."""
    return sizing.kv_cache_bytes(model.n_layers, model.n_kv_heads, model.head_dim, tokens,
                                 bytes_per_value(dtype))


def decode_tokens_per_s(params: float, bytes_per_param: float, chip: Chip, n_chips: int = 1,
                        batch: int = 1, kv_bytes_per_seq: float = 0.0,
                        dtype: str = "bfloat16") -> float:
    """Output tokens per second of `batch` sequences decoding together on `n_chips`: the
    slower of reading the weights and KV caches and doing 2·P FLOPs per token."""
    if params <= 0 or n_chips < 1 or batch < 1:
        raise CostError("need params > 0, at least one GPU and batch >= 1")
    memory_s = (params * bytes_per_param + batch * kv_bytes_per_seq) / (
        n_chips * chip.hbm_bandwidth)
    compute_s = 2 * params * batch / (n_chips * chip.peak(dtype))
    return batch / max(memory_s, compute_s)


def dollars_per_million_tokens(dollars_per_hour: float, tokens_per_s: float) -> float:
    if dollars_per_hour <= 0 or tokens_per_s <= 0:
        raise CostError("need a price > 0 $/h and a throughput > 0 tokens/s")
    return dollars_per_hour / 3600 / tokens_per_s * 1e6


def instance(name: str) -> Instance:
    if name not in INSTANCES:
        raise CostError(f"unknown instance {name!r}; known: {', '.join(INSTANCES)} "
                        "(or give --price and --gpus)")
    return INSTANCES[name]


def chip(name: str) -> Chip:
    if name not in CHIPS:
        raise CostError(f"unknown chip {name!r}; known: {', '.join(CHIPS)}")
    return CHIPS[name]
