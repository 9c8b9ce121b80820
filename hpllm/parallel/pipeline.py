"""GPipe pipeline parallelism over the mesh axis "stage".

The decoder's L layers are split into P stages of L/P consecutive layers; stage p lives on the
devices at position p of the "stage" axis. The batch is split into M microbatches. At time
step t = 0 .. M+P-2, stage p works on microbatch t-p (if 0 <= t-p < M, else it idles: the
bubble), then passes its output to stage p+1 with `jax.lax.ppermute`. Stage 0 reads its
microbatch from the input, the last stage writes its result into the output. The whole
schedule is a `lax.scan` over time inside `jax.shard_map`, so `jax.grad` gives the backward
pipeline (reverse ppermutes, the same schedule run backwards) for free: GPipe's "all forward,
then all backward" with every microbatch's activations kept until its backward pass.

Fraction of stage-steps idle: (P-1) / (M+P-1) in each direction (`bubble_fraction`; `gpipe`
also counts the busy steps it actually ran, which the tests check against it). Every stage
keeps all M microbatches' activations until the backward: hpllm/parallel/one_f_one_b.py is
the schedule that keeps at most P (same bubble).

Memory: the training state's `layers` axis is sharded over "stage" (the sharding rules), so
stage p's devices hold only its L/P layers' weights, gradients and AdamW moments; the
reshape (L, ...) -> (P, L/P, ...) below splits that axis where it is already split, so it
moves no data.

Only "stage" is manual inside the pipeline; the other mesh axes (data, fsdp, tensor, expert)
stay under the sharding rules, so data/FSDP/tensor/expert parallelism compose with it.
Microbatch m is rows m, m+M, m+2M, ... of the batch, so each device's rows spread evenly over
microbatches and splitting the batch moves no data. The embedding and the output projection
run outside the pipeline on every stage. The schedule knows nothing of the model: it runs
whatever stack function it is given (the training step passes the model's decoder stack).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hpllm.parallel import sharding

AXIS = "stage"


def gpipe_schedule(stages: int, microbatches: int) -> np.ndarray:
    """(M+P-1, P) table: the microbatch stage p works on at time step t, or -1 when idle."""
    t = np.arange(microbatches + stages - 1)[:, None]
    mb = t - np.arange(stages)[None, :]
    return np.where((mb >= 0) & (mb < microbatches), mb, -1)


SCHEDULES = ("gpipe", "1f1b")


def bubble_fraction(stages: int, microbatches: int, schedule: str = "gpipe") -> float:
    """Idle fraction of the stage-steps: (P-1) / (M+P-1) for GPipe (M+P-1 steps each way,
    M busy) and for 1F1B (2(M+P-1) units of one forward or one backward, 2M busy)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r} (known: {SCHEDULES})")
    return (stages - 1) / (microbatches + stages - 1)


def split_microbatches(a, microbatches: int):
    """(B, ...) -> (B/M, M, ...): microbatch m (axis 1) is rows m, m+M, ...; each device's
    rows spread evenly over the microbatches, so the split moves no data."""
    return a.reshape(a.shape[0] // microbatches, microbatches, *a.shape[1:])


def zeros_varying(shapes):
    """Zeros of a pytree of shapes, marked as differing per stage ("varying" over AXIS), as
    a pipeline's carries do."""
    return jax.tree.map(lambda s: jax.lax.pcast(jnp.zeros(s.shape, s.dtype), AXIS,
                                                to="varying"), shapes)


def _gpipe_local(stage_params, x, extras, *, stage_fn, microbatches: int, stages: int):
    """One stage's view (inside shard_map, manual over AXIS). stage_params: this stage's
    slice, leading axis 1; x, extras: the whole batch (B, ...). Returns the outputs (B, ...)
    (on every stage), this stage's summed stats and its busy step count."""
    stage = jax.lax.axis_index(AXIS)
    params = jax.tree.map(lambda a: a[0], stage_params)
    m = microbatches
    split = functools.partial(split_microbatches, microbatches=m)
    # inputs arrive the same on every stage; what a stage computes from them differs
    xs = jax.lax.pcast(split(x), AXIS, to="varying")
    ex = jax.tree.map(split, extras)
    take = lambda a, i: jax.lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False)  # noqa: E731
    shift = [(i, i + 1) for i in range(stages - 1)]  # the last stage sends nowhere

    def step(carry, t):
        received, outputs, busy, stats = carry
        mb = t - stage
        active = (mb >= 0) & (mb < m)
        i = jnp.clip(mb, 0, m - 1)
        inp = jnp.where(stage == 0, take(xs, i), received)
        out, new_stats = stage_fn(params, inp, jax.tree.map(lambda a: take(a, i), ex))
        done = active & (stage == stages - 1)
        outputs = jax.lax.dynamic_update_index_in_dim(
            outputs, jnp.where(done, out, take(outputs, i)), i, axis=1)
        stats = jax.tree.map(lambda s, n: s + jnp.where(active, n, jnp.zeros_like(n)),
                             stats, new_stats)
        received = jax.lax.ppermute(out, AXIS, shift)
        return (received, outputs, busy + active.astype(jnp.int32), stats), None

    out_shape = jax.eval_shape(stage_fn, params, take(xs, 0),
                               jax.tree.map(lambda a: take(a, 0), ex))
    init = (zeros_varying(out_shape[0]), jnp.zeros_like(xs, out_shape[0].dtype),
            zeros_varying(jax.ShapeDtypeStruct((), jnp.int32)), zeros_varying(out_shape[1]))
    (_, outputs, busy, stats), _ = jax.lax.scan(step, init, jnp.arange(m + stages - 1))
    # every stage gets the last stage's outputs (the output projection runs on all of them)
    outputs = jax.lax.psum(jnp.where(stage == stages - 1, outputs, 0), AXIS)
    return outputs.reshape(x.shape[:1] + outputs.shape[2:]), stats, busy[None]


def pipeline_mesh(mesh, x, microbatches: int, schedule: str):
    """The mesh a pipeline runs over (`mesh`, else the context mesh), checked: it has a
    "stage" axis and the batch of x splits into `microbatches`."""
    mesh = mesh if mesh is not None else sharding.context_mesh()
    if mesh is None or AXIS not in mesh.axis_names:
        raise ValueError(f"{schedule} needs a mesh with a 'stage' axis (jax.set_mesh or the "
                         "sharding rules of the training step)")
    if x.shape[0] % microbatches:
        raise ValueError(f"batch {x.shape[0]} is not divisible into {microbatches} microbatches")
    return mesh


def gpipe(stage_fn, stage_params, x, extras, *, microbatches: int, mesh=None):
    """Run `stage_fn(params_of_one_stage, x_microbatch, extras_microbatch) -> (y, stats)`
    (y shaped like x, stats a pytree of sums over the microbatch's rows) as a GPipe pipeline.

    stage_params: pytree with leading axis P (= the mesh's "stage" size); x (B, ...) and
    extras (pytree of (B, ...)) with B divisible by `microbatches`. Returns y (B, ...), the
    stats summed over microbatches and concatenated over stages on their leading axis, and
    busy (P,): the time steps each stage did real work (the rest of M+P-1 is bubble)."""
    mesh = pipeline_mesh(mesh, x, microbatches, "gpipe")
    body = functools.partial(_gpipe_local, stage_fn=stage_fn, microbatches=microbatches,
                             stages=mesh.shape[AXIS])
    return jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS), P(), P()),
                         out_specs=(P(), P(AXIS), P(AXIS)), axis_names={AXIS})(
        stage_params, x, extras)


def rules_inside_stage():
    """The training step's sharding rules (if any) re-targeted at the mesh as seen inside the
    stage's shard_map, where "stage" is manual: the activation constraints of the other axes
    then still apply, and name no axis that is manual here (the rules' "stage" is dropped:
    "vocab" splits over it outside the pipeline)."""
    active = sharding.active_rules()
    if active is None:
        return contextlib.nullcontext()
    rules = {k: tuple(a for a in v if a != AXIS) for k, v in active[1].items()}
    return sharding.use_rules(jax.sharding.get_abstract_mesh(), rules)


def in_stage(fn):
    """fn run under `rules_inside_stage` (a stage function, or the last stage's loss)."""
    @functools.wraps(fn)
    def wrapped(*args):
        with rules_inside_stage():
            return fn(*args)
    return wrapped


def split_stages(layers, mesh):
    """Stacked layers (leading axis L) -> (P, L/P, ...) for the mesh's P stages. The layers
    axis is sharded over "stage" already, so the reshape moves no data."""
    stages = mesh.shape[AXIS] if mesh is not None and AXIS in mesh.axis_names else 1
    n_layers = jax.tree.leaves(layers)[0].shape[0]
    if n_layers % stages:
        raise ValueError(f"n_layers ({n_layers}) is not divisible into {stages} stages")
    return jax.tree.map(lambda a: a.reshape(stages, n_layers // stages, *a.shape[1:]), layers)


def pipeline_layers(stack_fn, layers, x, extras, *, microbatches: int, mesh=None):
    """`stack_fn(layers, x, extras) -> (x, stats)`, a function that runs a stack of layers
    (leading axis L) over the activations x (B, ...), run as a GPipe pipeline over the mesh's
    "stage" axis: stage p applies layers p L/P .. (p+1) L/P - 1 to each microbatch. extras
    (pytree of (B, ...): positions, segment ids) go with their microbatch. Returns x and the
    stats, as `stack_fn(layers, x, extras)` would (stats summed over microbatches)."""
    mesh = mesh if mesh is not None else sharding.context_mesh()
    x, stats, _ = gpipe(in_stage(stack_fn), split_stages(layers, mesh), x, extras,
                        microbatches=microbatches, mesh=mesh)
    return x, stats
