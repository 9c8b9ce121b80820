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
also counts the busy steps it actually ran, which the tests check against it).

Only "stage" is manual inside the pipeline; the other mesh axes (data, fsdp, tensor, expert)
stay under the sharding rules, so data/FSDP/tensor/expert parallelism compose with it.
Microbatch m is rows m, m+M, m+2M, ... of the batch, so each device's rows spread evenly over
microbatches and splitting the batch moves no data. The embedding and the output projection
run outside the pipeline on every stage (as `forward` with no layers).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hpllm.config import ModelConfig
from hpllm.model.moe import context_mesh

AXIS = "stage"


def gpipe_schedule(stages: int, microbatches: int) -> np.ndarray:
    """(M+P-1, P) table: the microbatch stage p works on at time step t, or -1 when idle."""
    t = np.arange(microbatches + stages - 1)[:, None]
    mb = t - np.arange(stages)[None, :]
    return np.where((mb >= 0) & (mb < microbatches), mb, -1)


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle fraction of the stage-steps of a GPipe schedule: (P-1) / (M+P-1)."""
    return (stages - 1) / (microbatches + stages - 1)


def _gpipe_local(stage_params, x, extras, *, stage_fn, microbatches: int, stages: int):
    """One stage's view (inside shard_map, manual over AXIS). stage_params: this stage's
    slice, leading axis 1; x, extras: the whole batch (B, ...). Returns the outputs (B, ...)
    (on every stage), this stage's summed stats and its busy step count."""
    stage = jax.lax.axis_index(AXIS)
    params = jax.tree.map(lambda a: a[0], stage_params)
    m = microbatches
    split = lambda a: a.reshape(a.shape[0] // m, m, *a.shape[1:])  # noqa: E731
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
    # carries differ per stage ("varying" over AXIS), so their zeros must say so
    zeros = lambda s: jax.lax.pcast(jnp.zeros(s.shape, s.dtype), AXIS, to="varying")  # noqa: E731
    init = (zeros(out_shape[0]), jnp.zeros_like(xs, out_shape[0].dtype),
            zeros(jax.ShapeDtypeStruct((), jnp.int32)), jax.tree.map(zeros, out_shape[1]))
    (_, outputs, busy, stats), _ = jax.lax.scan(step, init, jnp.arange(m + stages - 1))
    # every stage gets the last stage's outputs (the output projection runs on all of them)
    outputs = jax.lax.psum(jnp.where(stage == stages - 1, outputs, 0), AXIS)
    return outputs.reshape(x.shape[:1] + outputs.shape[2:]), stats, busy[None]


def gpipe(stage_fn, stage_params, x, extras, *, microbatches: int, mesh=None):
    """Run `stage_fn(params_of_one_stage, x_microbatch, extras_microbatch) -> (y, stats)`
    (y shaped like x, stats a pytree of sums over the microbatch's rows) as a GPipe pipeline.

    stage_params: pytree with leading axis P (= the mesh's "stage" size); x (B, ...) and
    extras (pytree of (B, ...)) with B divisible by `microbatches`. Returns y (B, ...), the
    stats summed over microbatches and concatenated over stages on their leading axis, and
    busy (P,): the time steps each stage did real work (the rest of M+P-1 is bubble)."""
    mesh = mesh if mesh is not None else context_mesh()
    if mesh is None or AXIS not in mesh.axis_names:
        raise ValueError("gpipe needs a mesh with a 'stage' axis (jax.set_mesh or the "
                         "sharding rules of the training step)")
    stages = mesh.shape[AXIS]
    if x.shape[0] % microbatches:
        raise ValueError(f"batch {x.shape[0]} is not divisible into {microbatches} microbatches")
    body = functools.partial(_gpipe_local, stage_fn=stage_fn, microbatches=microbatches,
                                 stages=stages)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS), P(), P()),
                         out_specs=(P(), P(AXIS), P(AXIS)), axis_names={AXIS})(
        stage_params, x, extras)


def _rules_inside_stage():
    """The training step's sharding rules (if any) re-targeted at the mesh as seen inside the
    stage's shard_map, where "stage" is manual: the activation constraints of the other axes
    then still apply, and name no axis that is manual here."""
    from hpllm.parallel import sharding

    active = sharding.active_rules()
    if active is None:
        return contextlib.nullcontext()
    return sharding.use_rules(jax.sharding.get_abstract_mesh(), active[1])


def _no_layers(params):
    return {**params, "layers": jax.tree.map(lambda a: a[:0], params["layers"])}


def pipeline_forward(params, tokens, positions, config: ModelConfig, *, microbatches: int,
                     segment_ids=None, dtype=jnp.float32, remat: str = "none", mesh=None):
    """`forward` (training form: no cache) with the layers run as a GPipe pipeline over the
    mesh's "stage" axis. Returns logits (B, S, V) and the MoE routing stats (None if dense)."""
    from hpllm.model.transformer import forward

    mesh = mesh if mesh is not None else context_mesh()
    stages = mesh.shape[AXIS] if mesh is not None and AXIS in mesh.axis_names else 1
    if config.n_layers % stages:
        raise ValueError(f"n_layers ({config.n_layers}) is not divisible into {stages} stages")
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    kw = dict(dtype=dtype, remat=remat)
    # embedding (forward with no layers, stopped before the output norm)
    h, _ = forward(_no_layers(params), tokens, positions, config, output_hidden=True, **kw)

    def stage_fn(layers, h, ex):
        with _rules_inside_stage():
            out = forward({"layers": layers}, ex["tokens"], ex["positions"], config,
                          segment_ids=ex["segment_ids"], hidden=h, output_hidden=True,
                          moe_stats=True, **kw)
        return out[0], out[2]

    by_stage = jax.tree.map(lambda a: a.reshape(stages, a.shape[0] // stages, *a.shape[1:]),
                            params["layers"])
    extras = {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}
    h, stats, _ = gpipe(stage_fn, by_stage, h, extras, microbatches=microbatches, mesh=mesh)
    logits, _ = forward(_no_layers(params), tokens, positions, config, hidden=h, **kw)
    return logits, stats
