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


def _check_divisible(size: int, n: int, axis: int) -> None:
    if size % n:
        raise ValueError(f"dimension {axis} of size {size} is not divisible by the axis size {n}")


def _halves(size: int, bidirectional: bool) -> list[tuple[int, int, int]]:
    """(offset, length, direction) of the parts of a block that travel separately: the whole
    block clockwise, or (bidirectional, even sizes) one half each way."""
    if bidirectional and size % 2 == 0:
        return [(0, size // 2, +1), (size // 2, size // 2, -1)]
    return [(0, size, +1)]


def ring_all_gather(x, axis_name: str, *, axis: int = 0, tiled: bool = True,
                    bidirectional: bool = False):
    """Like jax.lax.all_gather(x, axis_name, axis=axis, tiled=tiled), over a ring.

    Each received block is written once, straight into its place in the output."""
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    size = x.shape[axis]
    shape = list(x.shape)
    shape[axis] *= n
    out = jnp.zeros(shape, x.dtype)
    for offset, length, direction in _halves(size, bidirectional):
        part = jax.lax.slice_in_dim(x, offset, offset + length, axis=axis)
        for s in range(n):  # at step s we hold the part of device idx - s*direction
            source = (idx - s * direction) % n
            out = jax.lax.dynamic_update_slice_in_dim(out, part, source * size + offset, axis)
            if s < n - 1:
                part = _shift(part, axis_name, n, direction)
    if not tiled:  # block j occupies [j*size, (j+1)*size): splitting the axis is free
        return out.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:])
    return out


def ring_reduce_scatter(x, axis_name: str, *, scatter_dimension: int = 0,
                        bidirectional: bool = False):
    """Like jax.lax.psum_scatter(x, axis_name, scatter_dimension=..., tiled=True).

    The running sum for chunk c walks the ring; each device adds its own slice of chunk c
    (read in place from x) as the sum passes. At step s device idx holds the partial sum of
    chunk idx - (s+1)*direction, which after n-1 steps is chunk idx itself."""
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    axis = scatter_dimension
    _check_divisible(x.shape[axis], n, axis)
    chunk = x.shape[axis] // n
    parts = []
    for offset, length, direction in _halves(chunk, bidirectional):
        def own(c):
            return jax.lax.dynamic_slice_in_dim(x, c * chunk + offset, length, axis)
        acc = own((idx - direction) % n)
        for s in range(1, n):
            acc = _shift(acc, axis_name, n, direction) + own((idx - (s + 1) * direction) % n)
        parts.append(acc)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


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

def all_gather_matmul(x, w, axis_name: str, *, axis: int = 0, matmul=jnp.matmul):
    """matmul(all_gather(x, axis), w) without waiting for the whole gather.

    x: the local block, split along `axis` over the ring (e.g. (M/n, K) rows, or a
    (B, S/n, D) sequence block); w: the local weights (e.g. a column shard in tensor
    parallelism). Each step multiplies the block in hand while the next block travels, so
    the n-1 hops hide behind n-1 of the n matmuls. `matmul(block, w)` must keep the gathered
    dimension at index `axis` of its result (the leading dims of an einsum do), where the
    n products are placed: the result is matmul(full x, w).
    """
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    size = x.shape[axis]
    part = jax.eval_shape(matmul, x, w)
    shape = list(part.shape)
    shape[axis] *= n
    out = jnp.zeros(shape, part.dtype)
    block = x
    for s in range(n):
        nxt = _shift(block, axis_name, n, +1) if s < n - 1 else None  # in flight during dot
        out = jax.lax.dynamic_update_slice_in_dim(out, matmul(block, w),
                                                  ((idx - s) % n) * size, axis)
        block = nxt
    return out


def matmul_reduce_scatter(x, w, axis_name: str, *, axis: int = 0, matmul=jnp.matmul):
    """psum_scatter(matmul(x, w), scatter `axis`) without forming the full partial product.

    x: e.g. (M, K/n) with K sharded and w (K/n, N): each device holds a partial sum of the
    whole product. Each device's partial product for block c of `axis` (of x, and of the
    result, which `matmul` must keep in place) is computed just before the running sum for
    block c passes through it, so every hop overlaps the next block's matmul. Returns this
    device's block of the sum (block `axis_index` along `axis`).
    """
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    _check_divisible(x.shape[axis], n, axis)
    size = x.shape[axis] // n

    def partial(c):  # this device's contribution to block c
        return matmul(jax.lax.dynamic_slice_in_dim(x, c * size, size, axis), w)

    acc = partial((idx - 1) % n)
    for s in range(1, n):
        acc = _shift(acc, axis_name, n, +1) + partial((idx - s - 1) % n)
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
