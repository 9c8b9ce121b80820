"""Tensor-parallel layers (Megatron-style) over one mesh axis, with sequence-sharded
activations between them, and the collective-matmul switch.

Between layers each device holds S/n rows of the activations (sequence parallelism), so the
norms and residual adds are not repeated n times. A column-parallel matmul needs all rows:
all-gather them, multiply by the local column shard. A row-parallel matmul produces partial
sums of all rows: reduce-scatter them back to S/n rows. With `collective_matmul=True` the
gather and the scatter are fused into the matmuls (`all_gather_matmul`,
`matmul_reduce_scatter`), so each ring hop travels while a block is being multiplied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from hpllm.parallel.collectives import all_gather_matmul, matmul_reduce_scatter


def swiglu_sequence_parallel(x, w_gate, w_up, w_down, axis_name: str, *,
                             collective_matmul: bool = False):
    """SwiGLU MLP inside shard_map. x: (rows/n, D) local rows; w_gate, w_up: (D, F/n) column
    shards; w_down: (F/n, D) row shard. Returns this device's (rows/n, D) output rows."""
    f = w_gate.shape[1]
    w_in = jnp.concatenate([w_gate, w_up], axis=1)  # one gather serves both projections
    if collective_matmul:
        h = all_gather_matmul(x, w_in, axis_name)
    else:
        h = jax.lax.all_gather(x, axis_name, tiled=True) @ w_in
    h = jax.nn.silu(h[:, :f]) * h[:, f:]
    if collective_matmul:
        return matmul_reduce_scatter(h, w_down, axis_name)
    return jax.lax.psum_scatter(h @ w_down, axis_name, tiled=True)


def sharded_swiglu(mesh: Mesh, axis_name: str, *, collective_matmul: bool = False):
    """Jitted global-array SwiGLU: x (rows, D) sharded by rows, w_gate/w_up (D, F) by columns,
    w_down (F, D) by rows over `axis_name`; output (rows, D) sharded by rows."""
    body = functools.partial(swiglu_sequence_parallel, axis_name=axis_name,
                             collective_matmul=collective_matmul)
    return jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=(P(axis_name), P(None, axis_name), P(None, axis_name),
                                   P(axis_name)),
        out_specs=P(axis_name), check_vma=False))
