"""Logical axis names -> mesh axes: one rules table makes DP, FSDP, TP and their mixes config.

Every parameter carries logical axis names (`hpllm.model.transformer.param_axes`) and the
model marks a few activations with `constrain(x, ("batch", "seq", "embed"))`. `RULES` maps
each logical name to the mesh axes that split it; a mesh axis of size 1 splits nothing, so
the same table gives

    data=N     DP: the batch split N ways, parameters and optimizer state replicated
    fsdp=N     FSDP (ZeRO-3): the batch split N ways and every parameter's `embed` dim too;
               XLA all-gathers each layer's weights before use, reduce-scatters the gradients
    tensor=N   TP (Megatron): heads and MLP columns split N ways (column-parallel wq/wk/wv,
               w_gate/w_up; row-parallel wo, w_down), vocab-parallel logits, and the residual
               stream between blocks split along the sequence (sequence parallelism: norms and
               adds are not repeated on every device; XLA turns the all-reduce after each
               block into reduce-scatter + all-gather)

    stage=N    pipeline (hpllm/parallel/pipeline.py): the stacked `layers` axis split N ways,
               so each stage holds only its own layers' weights, gradients and optimizer
               state; the embedding's vocab rows split N ways as well (the output
               projection and loss, outside the pipeline, are then vocab-parallel over
               stages instead of repeated on each)

and every combination. A dimension takes the mesh axes of its rule that earlier dimensions
of the same array have not used (activations are (batch, seq, embed): batch takes fsdp, so
embed stays whole) and that divide its size (4 KV heads on tensor=8 stay replicated).
GSPMD (XLA's partitioner) does the rest: these are annotations, not hand-written collectives.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hpllm.config import Config, ConfigError
from hpllm.parallel.mesh import make_mesh

Rules = Mapping[str, Sequence[str]]

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),  # outside MoE layers expert devices are data-parallel
    "seq": ("tensor",),  # residual-stream activations only (Megatron sequence parallelism)
    "embed": ("fsdp",),  # parameters (ZeRO-3); activations' embed loses fsdp to batch
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor", "stage"),  # pipeline: the embedding is split over stages too
    "layers": ("stage",),  # pipeline: stage p holds only its L/P layers
    "experts": ("expert",),
    "stage": ("stage",),
}


def logical_spec(axes: Sequence[str | None], rules: Rules = RULES, *, mesh: Mesh | None = None,
                 shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions have logical names `axes` (None: never
    split). With `mesh`, axes of size 1 are left out; with `shape` too, so is any mesh axis
    that does not divide its dimension (that dimension is then split less, or not at all)."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r} (rules: "
                           f"{', '.join(rules)})")
        chosen = []
        for axis in rules[name]:
            if axis in used:
                continue
            if mesh is not None:
                size = mesh.shape[axis]
                if size == 1:
                    continue
                if shape is not None and shape[i] % (math.prod(mesh.shape[a] for a in chosen)
                                                     * size):
                    continue
            chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:  # P('x', None) == P('x'); the short form reads better
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules: Rules = RULES, memory_kind: str | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, rules, mesh=mesh, shape=shape),
                         memory_kind=memory_kind)


def tree_shardings(mesh: Mesh, axes, shapes, rules: Rules = RULES):
    """NamedSharding of every leaf of a tree, from the tree of its logical axis names (tuples,
    e.g. `hpllm.model.transformer.param_axes`) and the tree of its shapes."""
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731 (the leaves are tuples of names)
    return jax.tree.map(lambda a, shape: named_sharding(mesh, a, shape, rules), axes, shapes,
                        is_leaf=is_axes)


def replicated(mesh: Mesh, memory_kind: str | None = None) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(), memory_kind=memory_kind)


def batch_sharding(mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
    """Sharding of the (batch, seq) arrays of a training batch: rows split over the batch
    axes (data, fsdp, expert), each row whole."""
    return NamedSharding(mesh, logical_spec(("batch",), rules, mesh=mesh))


def batch_axis_size(mesh: Mesh, rules: Rules = RULES) -> int:
    """How many ways a batch is split: the batch size must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in rules["batch"])


# ---------------------------------------------------------------------- activation constraints
# `constrain` needs the mesh and rules of the step being traced. They are set for the duration
# of a trace (`use_rules`, entered inside the jitted function, so a cached trace never runs
# under other rules); without them constrain is the identity, so single-device code, decoding
# and tests of the model alone do not change.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("hpllm_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules = RULES):
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, Rules] | None:
    """(mesh, rules) of the trace in progress, or None outside a sharded step."""
    return _ACTIVE.get()


def context_mesh() -> Mesh | None:
    """The mesh of the step being traced: the sharding rules' (`use_rules`, as the training
    step sets them) or else `jax.set_mesh`'s; None without."""
    active = _ACTIVE.get()
    mesh = active[0] if active is not None else jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x, logical_axes: Sequence[str | None]):
    """x with its sharding pinned to `logical_axes` under the active rules (else x itself)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} axis names {tuple(logical_axes)} for "
                         f"an array of rank {x.ndim}")
    spec = logical_spec(logical_axes, rules, mesh=mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def under_rules(fn, mesh: Mesh, rules: Rules = RULES):
    """fn traced with `use_rules(mesh, rules)` active (wrap before jit)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with use_rules(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


def shard_batch(batch: Mapping[str, jnp.ndarray], mesh: Mesh, rules: Rules = RULES) -> dict:
    """Place a host batch (whole, on every process) onto the mesh, rows split over the batch
    axes. For multi-process runs where each process holds only its rows see
    `hpllm.parallel.distributed.global_batch`."""
    sharding = batch_sharding(mesh, rules)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def training_mesh(config: Config) -> Mesh | None:
    """The mesh `config.mesh` describes, or None for one device in one process (the plain
    single-device step). Checks that the batch splits evenly over the batch axes."""
    mesh = make_mesh(config.mesh)
    if mesh.size == 1 and jax.process_count() == 1:
        return None
    ways = batch_axis_size(mesh)
    if config.train.batch_size % ways:
        raise ConfigError(f"batch_size ({config.train.batch_size}) must be divisible by the "
                          f"{ways} ways the mesh splits the batch (data x fsdp x expert)")
    return mesh
