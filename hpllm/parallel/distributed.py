"""Several processes, one program: `jax.distributed` start-up and per-process data.

Every process runs the same training script; after `initialize`, `jax.devices()` lists the
devices of all processes and a mesh spans them. Each process builds only the batch rows its
own devices hold (`global_batch`), and jit runs the step on the global arrays.

Start-up comes from flags or the environment (flags win):

    HPLLM_COORDINATOR_ADDRESS   host:port of process 0's coordinator service
    HPLLM_NUM_PROCESSES         how many processes take part
    HPLLM_PROCESS_ID            this process's index, 0 ... num_processes - 1

Without a coordinator address nothing happens (one process), except on clusters JAX
detects by itself (SLURM, Open MPI, TPU pods, ...) when `auto=True`.
On CPU the collectives between processes go through gloo (`jax_cpu_collectives_
implementation`), which must be chosen before the backend starts, i.e. before any JAX
computation in the process.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import jax
import numpy as np

from hpllm.config import ConfigError

ENV = {"coordinator_address": "HPLLM_COORDINATOR_ADDRESS",
       "num_processes": "HPLLM_NUM_PROCESSES", "process_id": "HPLLM_PROCESS_ID"}


def settings_from_env(coordinator_address: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, environ: Mapping[str, str] = os.environ
                      ) -> dict:
    """The three start-up values, each from its argument or else its environment variable."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    out = {}
    for key, value in given.items():
        if value is None or value == "":
            value = environ.get(ENV[key]) or None
        if value is not None and key != "coordinator_address":
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{key} ({ENV[key]}) expects an int, got {value!r}") from None
        out[key] = value
    if out["coordinator_address"] is None:
        if out["num_processes"] not in (None, 1) or out["process_id"] not in (None, 0):
            raise ConfigError("num_processes/process_id need a coordinator address "
                              f"(--coordinator_address or {ENV['coordinator_address']})")
        return out
    if out["num_processes"] is None or out["process_id"] is None:
        raise ConfigError("a coordinator address needs num_processes and process_id too")
    if out["num_processes"] < 1 or not 0 <= out["process_id"] < out["num_processes"]:
        raise ConfigError(f"process_id must be in [0, num_processes), got process_id "
                          f"{out['process_id']} of {out['num_processes']}")
    host, _, port = out["coordinator_address"].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"coordinator address must be host:port, got "
                          f"{out['coordinator_address']!r}")
    return out


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               cpu_collectives: str = "gloo") -> bool:
    """Join the process group if one is described; True if this is a multi-process run.
    Call it first thing, before any JAX computation."""
    settings = settings_from_env(coordinator_address, num_processes, process_id)
    if settings["coordinator_address"] is None and not auto:
        return False
    if settings["num_processes"] == 1:
        return False
    # Without this, CPU processes would each compute alone ("collectives not implemented").
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if settings["coordinator_address"] is None:
        jax.distributed.initialize()  # cluster auto-detection
    else:
        jax.distributed.initialize(**settings)
    return jax.process_count() > 1


def is_primary() -> bool:
    """Process 0: the one that logs and writes the run's files."""
    return jax.process_index() == 0


def local_row_ranges(sharding: jax.sharding.Sharding, shape: tuple[int, ...]
                     ) -> list[tuple[int, int]]:
    """The (start, stop) row ranges of a (rows, ...) array this process's devices hold."""
    ranges = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        start, stop, _ = index[0].indices(shape[0])
        ranges.add((start, stop))
    return sorted(ranges)


def global_batch(rows_fn: Callable[[int, int], Mapping[str, np.ndarray]], batch_size: int,
                 sharding: jax.sharding.Sharding) -> dict:
    """A batch of global arrays (batch_size, ...) laid out as `sharding`, of which this
    process computes only its own rows: rows_fn(start, stop) -> {name: rows start..stop}.
    Row ranges shared by several local devices (replicas) are computed once."""
    probe_shape = (batch_size, 1)
    pieces = {r: rows_fn(*r) for r in local_row_ranges(sharding, probe_shape)}
    first = next(iter(pieces.values()))
    out = {}
    for name, value in first.items():
        shape = (batch_size,) + value.shape[1:]

        def piece(index, name=name):
            start, stop, _ = index[0].indices(batch_size)
            return pieces[(start, stop)][name][(slice(None),) + tuple(index[1:])]

        out[name] = jax.make_array_from_callback(shape, sharding, piece)
    return out


def sharded_batches(dataset, sharding: jax.sharding.Sharding) -> Callable[[int], dict]:
    """step -> the training batch of `step` as global arrays; each process builds its rows
    (`dataset.batch_at(step, start, stop)`, as hpllm.train.data.PackedDataset has it)."""
    return lambda step: global_batch(lambda a, b: dataset.batch_at(step, a, b),
                                     dataset.batch_size, sharding)


def place_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
    """A host batch every process holds whole (e.g. validation) as global arrays."""
    rows = len(next(iter(batch.values())))
    return global_batch(lambda a, b: {k: v[a:b] for k, v in batch.items()}, rows, sharding)


def barrier(name: str) -> None:
    """All processes wait here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
