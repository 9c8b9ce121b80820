"""Tensor-parallel layers (Megatron-style) over one mesh axis, with sequence-sharded
activations between them, and the collective-matmul switch.

Between layers each device holds S/n rows of the activations (sequence parallelism), so the
norms and residual adds are not repeated n times. A column-parallel matmul needs all rows:
all-gather them, multiply by the local column shard. A row-parallel matmul produces partial
sums of all rows: reduce-scatter them back to S/n rows. A collective matmul fuses the gather
or the scatter into the matmul (`all_gather_matmul`, `matmul_reduce_scatter`), so each ring
hop travels while a block is being multiplied.

The model's projections go through `column_parallel` / `row_parallel`. With `ring=True`
(`ModelConfig.collective_matmul="ring"`) and sharding rules active that split the sequence
over a mesh axis (`hpllm.parallel.sharding.use_rules`, as the sharded training step sets
them) they run the ring collective matmuls in a `shard_map` that is manual over that axis
only (the batch and FSDP axes stay with GSPMD). Otherwise they are the plain projections,
around which GSPMD places a whole all-gather before and a reduce-scatter after.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from hpllm.parallel.collectives import all_gather_matmul, matmul_reduce_scatter
from hpllm.parallel.sharding import active_rules, logical_spec


def _einsum(x, w, equation):
    return jnp.einsum(equation, x, w)


def _ring_axis(x) -> tuple[Mesh, str] | None:
    """(mesh, axis) when the active rules split the sequence (dim 1 of the (batch, seq, ...)
    activation x) over exactly one mesh axis and we are not already inside a manual region
    (a pipeline stage): the axis the ring runs over. None: the plain path."""
    active = active_rules()
    if active is None or jax.sharding.get_abstract_mesh().manual_axes:
        return None
    mesh, rules = active
    spec = logical_spec(("batch", "seq"), rules, mesh=mesh, shape=x.shape[:2])
    seq = spec[1] if len(spec) > 1 else None
    if seq is None or isinstance(seq, tuple) and len(seq) != 1:
        return None
    return mesh, seq[0] if isinstance(seq, tuple) else seq


def _letters(equation: str) -> tuple[str, str, str]:
    inputs, out = equation.replace(" ", "").split("->")
    x, w = inputs.split(",")
    if "." in equation or x[:2] != out[:2]:
        raise ValueError(f"a tensor-parallel projection needs an explicit einsum whose output "
                         f"starts with x's (batch, seq) letters, got {equation!r}")
    return x, w, out


def _spec(ndim_before: int, axis: str) -> P:
    return P(*([None] * ndim_before), axis)


def _divisible(mesh: Mesh, axis: str, dims) -> bool:
    return all(size % mesh.shape[axis] == 0 for size in dims)


def column_parallel(x, weights, equation: str, *, ring: bool = False, project=_einsum):
    """`project(x, w, equation)` for each of `weights`, column-parallel: x is the residual
    stream (batch, seq, ...), each weight's first output dimension (heads, kv_heads, mlp) is
    split over the tensor axis. With `ring` under rules that split the sequence: one
    all-gather matmul serves all the weights (concatenated along that dimension), so the
    sequence blocks travel once, each while the one before is multiplied. Otherwise (no
    rules, quantized weights, a dimension the axis does not divide) the plain projections."""
    mesh_axis = _ring_axis(x) if ring else None
    if mesh_axis is not None:
        xl, wl, out = _letters(equation)
        split = next(c for c in wl if c not in xl)  # the weights' first output dimension
        dim = wl.index(split)
        mesh, axis = mesh_axis
        if (all(isinstance(w, jax.Array) for w in weights)  # not quantized
                and _divisible(mesh, axis, [x.shape[1]] + [w.shape[dim] for w in weights])):
            return _column_ring(x, weights, equation, mesh, axis, dim, out.index(split))
    return tuple(project(x, w, equation) for w in weights)


def _column_ring(x, weights, equation, mesh, axis, dim, out_dim):
    widths = [w.shape[dim] // mesh.shape[axis] for w in weights]  # each weight's local part
    matmul = functools.partial(jnp.einsum, equation)

    def body(x, *ws):
        y = all_gather_matmul(x, jnp.concatenate(ws, axis=dim), axis, axis=1, matmul=matmul)
        return tuple(jnp.split(y, list(itertools.accumulate(widths))[:-1], axis=out_dim))

    return jax.shard_map(body, mesh=mesh, in_specs=(_spec(1, axis),) + (_spec(dim, axis),)
                         * len(weights), out_specs=(_spec(out_dim, axis),) * len(weights),
                         axis_names={axis}, check_vma=False)(x, *weights)


def row_parallel(x, w, equation: str, *, ring: bool = False, project=_einsum):
    """`project(x, w, equation)`, row-parallel: x's first contracted dimension (heads, mlp)
    and the weight's are split over the tensor axis, so each device's product (batch, seq,
    ...) is a partial sum. With `ring` under rules that split the sequence: the sum is
    reduce-scattered over the sequence block by block, each hop beside the next block's
    matmul. Otherwise the plain projection."""
    mesh_axis = _ring_axis(x) if ring else None
    if mesh_axis is not None and isinstance(w, jax.Array):
        xl, wl, out = _letters(equation)
        split = next(c for c in xl if c in wl and c not in out)  # contracted, split
        mesh, axis = mesh_axis
        if _divisible(mesh, axis, [x.shape[1], x.shape[xl.index(split)]]):
            body = functools.partial(matmul_reduce_scatter, axis_name=axis, axis=1,
                                     matmul=functools.partial(jnp.einsum, equation))
            return jax.shard_map(body, mesh=mesh, in_specs=(_spec(xl.index(split), axis),
                                                            _spec(wl.index(split), axis)),
                                 out_specs=_spec(1, axis), axis_names={axis},
                                 check_vma=False)(x, w)
    return project(x, w, equation)
