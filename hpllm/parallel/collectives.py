"""Collectives from first principles: rings of `ppermute`s.

On a ring of n devices every device talks only to its neighbours:

* all-gather: each step, pass on the shard you received last step; after n-1 steps every
  device has every shard. Each link carries (n-1)/n of the array once.
* reduce-scatter: the same walk, but the receiver adds its own contribution for the chunk
  it just received; after n-1 steps device i holds the full sum of chunk i.
* all-reduce = reduce-scatter followed by all-gather (twice the traffic of either).
* bidirectional: real links carry data both ways at once; split each chunk in two halves
  and walk one half clockwise, the other counter-clockwise, halving the time per step.

The functions here run *inside* `jax.shard_map` over a named mesh axis (they take the local
shard and the axis name, like `jax.lax.all_gather`/`psum_scatter`/`psum`), so they compose
with jit, grad (ppermute's transpose is the reverse permutation) and any mesh. The loops are
Python loops over the static axis size: XLA sees each hop as its own collective-permute and
can overlap it with independent compute, which is what the collective matmuls below rely on.
The `*_sharded` wrappers apply them to global arrays for users and benchmarks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P


def _shift(x, axis_name: str, n: int, direction: int):
    """Send x to the neighbour `direction` (+1 right, -1 left) steps away on the ring."""
    return jax.lax.ppermute(x, axis_name, [(i, (i + direction) % n) for i in range(n)])


def _chunks(x, n: int, axis: int):
    if x.shape[axis] % n:
        raise ValueError(f"dimension {axis} of size {x.shape[axis]} is not divisible by the "
                         f"axis size {n}")
    return jnp.split(x, n, axis=axis)


def _ring_gather_blocks(block, axis_name: str, n: int, direction: int) -> list:
    """blocks[j] = the `block` of device j, collected by walking the ring in `direction`."""
    idx = jax.lax.axis_index(axis_name)
    received = [block]  # received[s] came from device idx - s*direction
    for _ in range(n - 1):
        received.append(_shift(received[-1], axis_name, n, direction))
    # Reorder by source device: source j = idx - s*direction (mod n)  <=>  s = (idx-j)*dir.
    stacked = jnp.stack(received)
    order = (direction * (idx - jnp.arange(n))) % n
    return stacked[order]


def ring_all_gather(x, axis_name: str, *, axis: int = 0, tiled: bool = True,
                    bidirectional: bool = False):
    """Like jax.lax.all_gather(x, axis_name, axis=axis, tiled=tiled), over a ring."""
    n = jax.lax.axis_size(axis_name)
    if bidirectional and x.shape[axis] % 2 == 0:
        a, b = jnp.split(x, 2, axis=axis)
        gathered = jnp.concatenate([_ring_gather_blocks(a, axis_name, n, +1),
                                    _ring_gather_blocks(b, axis_name, n, -1)], axis=axis + 1)
    else:
        gathered = _ring_gather_blocks(x, axis_name, n, +1)  # (n, *x.shape)
    if not tiled:
        return jnp.moveaxis(gathered, 0, axis)
    gathered = jnp.moveaxis(gathered, 0, axis)  # (..., n, size_axis, ...)
    shape = list(x.shape)
    shape[axis] *= n
    return gathered.reshape(shape)


def _ring_reduce_scatter_chunks(chunks: list, axis_name: str, n: int, direction: int):
    """Sum over devices of chunks[idx], by walking partial sums around the ring."""
    idx = jax.lax.axis_index(axis_name)
    stacked = jnp.stack(chunks)
    # At step s device idx holds the partial sum of chunk idx - (s+1)*direction; after n-1
    # steps that is chunk idx - n*direction = idx.
    acc = stacked[(idx - direction) % n]
    for s in range(1, n):
        acc = _shift(acc, axis_name, n, direction) + stacked[(idx - (s + 1) * direction) % n]
    return acc


def ring_reduce_scatter(x, axis_name: str, *, scatter_dimension: int = 0,
                        bidirectional: bool = False):
    """Like jax.lax.psum_scatter(x, axis_name, scatter_dimension=..., tiled=True)."""
    n = jax.lax.axis_size(axis_name)
    chunks = _chunks(x, n, scatter_dimension)
    if bidirectional and chunks[0].shape[scatter_dimension] % 2 == 0:
        halves = [jnp.split(c, 2, axis=scatter_dimension) for c in chunks]
        a = _ring_reduce_scatter_chunks([h[0] for h in halves], axis_name, n, +1)
        b = _ring_reduce_scatter_chunks([h[1] for h in halves], axis_name, n, -1)
        return jnp.concatenate([a, b], axis=scatter_dimension)
    return _ring_reduce_scatter_chunks(chunks, axis_name, n, +1)


def ring_all_reduce(x, axis_name: str, *, bidirectional: bool = False):
    """Like jax.lax.psum(x, axis_name): reduce-scatter then all-gather, any shape (the
    flattened array is zero-padded to a multiple of the axis size)."""
    n = jax.lax.axis_size(axis_name)
    flat = x.reshape(-1)
    pad = (-flat.size) % (2 * n if bidirectional else n)
    flat = jnp.pad(flat, (0, pad))
    part = ring_reduce_scatter(flat, axis_name, bidirectional=bidirectional)
    full = ring_all_gather(part, axis_name, bidirectional=bidirectional)
    return full[:x.size].reshape(x.shape)


# --------------------------------------------------------------------- collective matmuls

def all_gather_matmul(x, w, axis_name: str):
    """all_gather(x, axis 0) @ w without waiting for the whole gather.

    x: the local (M/n, K) row block; w: (K, N) local weights (e.g. a column shard in tensor
    parallelism). Each step multiplies the block in hand while the next block travels, so
    the n-1 hops hide behind n-1 of the n matmuls. Returns (M, N).
    """
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    block = x
    outputs = []
    for s in range(n):
        nxt = _shift(block, axis_name, n, +1) if s < n - 1 else None  # in flight during dot
        outputs.append(block @ w)  # rows of device idx - s
        block = nxt
    stacked = jnp.stack(outputs)  # stacked[s] = rows of device (idx - s)
    order = (idx - jnp.arange(n)) % n  # position j <- step (idx - j) mod n
    return stacked[order].reshape(-1, w.shape[1])


def matmul_reduce_scatter(x, w, axis_name: str):
    """psum_scatter(x @ w, scatter rows) without forming the full partial product first.

    x: (M, K/n) with K sharded; w: (K/n, N). Each device's partial product for row block c
    is computed just before the running sum for block c passes through it, so every hop
    overlaps the next block's matmul. Returns this device's (M/n, N) block of the sum.
    """
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    rows = jnp.stack(_chunks(x, n, 0))  # (n, M/n, K/n)
    acc = rows[(idx - 1) % n] @ w
    for s in range(1, n):
        moving = _shift(acc, axis_name, n, +1)
        acc = moving + rows[(idx - s - 1) % n] @ w
    return acc


# ----------------------------------------------------------------- global-array wrappers

IMPLEMENTATIONS = {
    "all_gather": {"xla": lambda x, a: jax.lax.all_gather(x, a, tiled=True),
                   "ring": ring_all_gather,
                   "ring_bidir": functools.partial(ring_all_gather, bidirectional=True)},
    "reduce_scatter": {"xla": lambda x, a: jax.lax.psum_scatter(x, a, tiled=True),
                       "ring": ring_reduce_scatter,
                       "ring_bidir": functools.partial(ring_reduce_scatter, bidirectional=True)},
    "all_reduce": {"xla": lambda x, a: jax.lax.psum(x, a),
                   "ring": ring_all_reduce,
                   "ring_bidir": functools.partial(ring_all_reduce, bidirectional=True)},
}


def sharded_collective(kind: str, impl: str, mesh: Mesh, axis_name: str):
    """A jitted function of a global array for one collective over `axis_name`:

    * all_gather: x sharded on dim 0 -> x replicated.
    * reduce_scatter: x of shape (n*rows, ...) holding one addend per device (row block d
      is device d's contribution) -> the sum, sharded on dim 0.
    * all_reduce: same input -> the sum of the n addends, replicated.
    """
    fn = IMPLEMENTATIONS[kind][impl]
    out_spec = P(axis_name) if kind == "reduce_scatter" else P()
    # check_vma=False: the replicated outputs of the ring versions are replicated by
    # construction, which shard_map's static check cannot see through ppermute.
    return jax.jit(jax.shard_map(lambda x: fn(x, axis_name), mesh=mesh, in_specs=P(axis_name),
                                 out_specs=out_spec, check_vma=False))
