"""1F1B (PipeDream-flush) pipeline parallelism over the mesh axis "stage": GPipe's bubble,
but each stage keeps at most P - p microbatches' activations (stage p of P) instead of M.

Schedule (`schedule`): time runs in units; in each unit every stage does one forward (F) or
one backward (B) of one microbatch, or idles. Stage p first runs min(P-1-p, M) forwards
(warm-up), then alternates F and B (steady state: one forward, one backward), then runs the
backwards left (cool-down). A forward needs the previous stage's output of an earlier unit,
a backward the next stage's gradient (at the last stage: its own forward); the table is the
earliest schedule that respects them. It takes 2(M+P-1) units, of which each stage is busy
2M: the idle fraction is (P-1)/(M+P-1), GPipe's (1F1B saves memory, not time). Interleaving
V virtual stages per device would cut it to (P-1)/(VM+P-1); not built.

Why the backward is explicit. GPipe (pipeline.py) is a forward scan that `jax.grad`
reverses, so all M forwards finish before any backward starts and every microbatch's
activations stay alive until then. 1F1B must run microbatch i's backward while later
microbatches are still going forward, so it cannot be the transpose of a forward program.
Here one `lax.scan` over the units, inside `jax.shard_map` (manual over "stage"), runs the
forward and the backward together, and a `jax.custom_vjp` hands the gradients it computed
to the surrounding `jax.grad`:

- an F unit runs `jax.vjp` of the stage on its microbatch and stashes the vjp's residuals
  (the activations the backward needs, not the parameters, which stay where they are) in a
  slot of a small ring buffer; at the last stage the stage and the loss (`last_fn`: output
  projection and the microbatch's summed token loss) are one function, so the loss and its
  gradient are computed where the activations are;
- a B unit rebuilds the vjp from its slot, applies it to the gradient that arrived from the
  next stage (at the last stage: 1), accumulates the parameter gradients and sends the input
  gradient down. Nothing is recomputed.

Which op a stage runs is a `lax.switch` on its row of the table (each device branches on its
own; the pipeline's collectives, two `ppermute`s per unit, one up for activations, one down
for gradients, sit outside the branches so every device reaches them; collectives that the
partitioner puts inside a branch, over data/FSDP/tensor, run among devices of one stage,
which all take the same branch). Messages carry their
microbatch number and land in ring buffers (activations waiting for their forward, gradients
for their backward); the ring sizes are the fewest slots in which no two live microbatches
collide, computed from the table. The custom_vjp's forward runs the whole schedule and keeps
the gradients; its backward scales them by the incoming cotangent (the 1/tokens of the mean
loss, the float16 loss scale), so the step's `jax.value_and_grad` is unchanged.

Costs beside GPipe's: the data-parallel all-reduce of a backward's parameter gradients
happens in every backward unit (M per step, not one), and the stage-split embedding is
all-gathered for the last stage's output projection.

Gradients flow through the loss only: the stats a stage returns (MoE routing sums) are
summed but not differentiated, so a load-balancing loss on them (which couples all
microbatches) cannot be trained this way; the config refuses 1F1B for MoE models.
"""

from __future__ import annotations

import functools

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hpllm.parallel import sharding
from hpllm.parallel.pipeline import (AXIS, in_stage, pipeline_mesh, split_microbatches,
                                     split_stages, zeros_varying)

IDLE, FORWARD, BACKWARD = 0, 1, 2


def schedule(stages: int, microbatches: int) -> np.ndarray:
    """(T, P, 2) int table, T = 2(M+P-1): (op, microbatch) of stage p at unit t, op one of
    IDLE, FORWARD, BACKWARD (microbatch -1 when idle)."""
    p_, m = stages, microbatches
    orders = []
    for p in range(p_):
        warm = min(p_ - 1 - p, m)
        ops = [(FORWARD, i) for i in range(warm)]
        for i in range(m - warm):
            ops += [(FORWARD, warm + i), (BACKWARD, i)]
        orders.append(ops + [(BACKWARD, i) for i in range(m - warm, m)])
    done = {FORWARD: np.full((p_, m), -1), BACKWARD: np.full((p_, m), -1)}
    ptr, rows = [0] * p_, []
    while min(ptr) < 2 * m:
        t, row = len(rows), []
        for p in range(p_):
            if ptr[p] == 2 * m:
                row.append((IDLE, -1))
                continue
            op, i = orders[p][ptr[p]]
            if op == FORWARD:
                dep = done[FORWARD][p - 1, i] if p > 0 else t - 1
            else:
                dep = done[FORWARD][p, i] if p == p_ - 1 else done[BACKWARD][p + 1, i]
            if 0 <= dep < t or (op == FORWARD and p == 0):
                done[op][p, i] = t
                ptr[p] += 1
                row.append((op, i))
            else:
                row.append((IDLE, -1))
        rows.append(row)
    return np.asarray(rows, np.int32)


def _times(table: np.ndarray, op: int) -> np.ndarray:
    """(P, M): the unit at which each stage runs `op` on each microbatch."""
    m = int(table[..., 1].max()) + 1
    out = np.full((table.shape[1], m), -1)
    t, p = np.nonzero(table[..., 0] == op)
    out[p, table[t, p, 1]] = t
    return out


def ring_slots(writes: np.ndarray, reads: np.ndarray) -> int:
    """Fewest slots k such that microbatch i using slot i % k from unit writes[p, i] (end of)
    to unit reads[p, i] never overlaps another microbatch in its slot, on any stage."""
    m = writes.shape[1]
    for k in range(1, m + 1):
        if all(not (writes[p, i] < reads[p, j] and writes[p, j] < reads[p, i])
               for p in range(writes.shape[0]) for i in range(m) for j in range(i + k, m, k)):
            return k
    return m


def in_flight(stages: int, microbatches: int) -> np.ndarray:
    """(P,): the most microbatches whose activations stage p holds at once (forward done,
    backward not yet): min(P - p, M). GPipe holds all M."""
    table = schedule(stages, microbatches)
    f, b = _times(table, FORWARD), _times(table, BACKWARD)
    t = np.arange(table.shape[0])[:, None, None]
    return ((f[None] <= t) & (t < b[None])).sum(-1).max(0)


def _slot_counts(table: np.ndarray) -> dict:
    f, b = _times(table, FORWARD), _times(table, BACKWARD)
    if len(f) == 1:
        return {"act": 1, "grad": 1, "stash": 1, "stash_last": ring_slots(f, b)}
    return {"act": ring_slots(f[:-1], f[1:]),  # stage p-1's output waits for p's forward
            "grad": ring_slots(b[1:], b[:-1]),  # stage p+1's gradient waits for p's backward
            "stash": ring_slots(f[:-1], b[:-1]), "stash_last": ring_slots(f[-1:], b[-1:])}


def _varying(tree):
    return jax.tree.map(lambda a: a if AXIS in jax.typeof(a).manual_axis_type.varying
                        else jax.lax.pcast(a, AXIS, to="varying"), tree)


def _accumulator(dtype):
    """Gradients add up over microbatches in at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _take(a, i, axis=0):
    return jax.lax.dynamic_index_in_dim(a, i, axis=axis, keepdims=False)


def _put(buf, i, value, when=None, axis=0):
    if when is not None:
        value = jnp.where(when, value, _take(buf, i, axis))
    return jax.lax.dynamic_update_index_in_dim(buf, value, i, axis=axis)


class _Residuals:
    """A vjp's residuals without the arguments it was taken of (those are not stashed: the
    parameters stay where they are): `split` gives the leaves to keep, `join` rebuilds the
    vjp from them and the arguments."""

    def __init__(self, vjp_fn, args):
        leaves, self.treedef = jax.tree.flatten(vjp_fn)
        ids = {id(a): k for k, a in enumerate(jax.tree.leaves(args))}
        self.from_args = [ids.get(id(leaf)) for leaf in leaves]
        self.shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a, k in
                       zip(leaves, self.from_args) if k is None]

    def split(self, vjp_fn, args):
        leaves = jax.tree.leaves(vjp_fn)
        arg_ids = [id(a) for a in jax.tree.leaves(args)]
        kept = [a for a, k in zip(leaves, self.from_args) if k is None]
        if (len(leaves) != len(self.from_args)
                or any(k is not None and id(a) != arg_ids[k]
                       for a, k in zip(leaves, self.from_args))
                or [(a.shape, a.dtype) for a in kept] != [(s.shape, s.dtype)
                                                          for s in self.shapes]):
            raise AssertionError("the stage's vjp residuals changed between two traces")
        return kept

    def join(self, kept, args):
        arg_leaves, kept = jax.tree.leaves(args), iter(kept)
        leaves = [next(kept) if k is None else arg_leaves[k] for k in self.from_args]
        return jax.tree.unflatten(self.treedef, leaves)


def _local(stage_params, head_params, x, extras, *, stage_fn, last_fn, microbatches, stages):
    """One stage's view inside shard_map: runs the table, returns its loss sum (nonzero on the
    last stage), stats, parameter and head gradients, the input gradient (nonzero on stage
    0) and its busy unit count."""
    table = schedule(stages, microbatches)
    slots = _slot_counts(table)
    stage = jax.lax.axis_index(AXIS)
    first, last = stage == 0, stage == stages - 1
    # everything a branch touches is per-stage ("varying"): a transpose must not psum
    params = _varying(jax.tree.map(lambda a: a[0], stage_params))
    head = _varying(head_params)
    # microbatch i: rows i, i+M, ... (axis 1 after the split), as in GPipe
    xs = _varying(split_microbatches(x, microbatches))
    ex = _varying(jax.tree.map(lambda a: split_microbatches(a, microbatches), extras))
    x_of = lambda i: _take(xs, i, 1)  # noqa: E731
    ex_of = lambda i: jax.tree.map(lambda a: _take(a, i, 1), ex)  # noqa: E731

    def joint(args, x_in, e):  # -> (loss, stats): the last stage and the loss
        p, h = args
        y, stats = stage_fn(p, x_in, e)
        return last_fn(h, y, e), stats

    x0, e0 = x_of(0), ex_of(0)
    y0, vjp_mid, stats0 = jax.vjp(lambda p, x_: stage_fn(p, x_, e0), params, x0,
                                  has_aux=True)
    res_mid = _Residuals(vjp_mid, params)
    _, vjp_last, _ = jax.vjp(lambda a, x_: joint(a, x_, e0), (params, head), x0, has_aux=True)
    res_last = _Residuals(vjp_last, (params, head))
    ring = lambda k, s: jax.ShapeDtypeStruct((k, *s.shape), s.dtype)  # noqa: E731
    like = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
    zero_loss = zeros_varying(jax.ShapeDtypeStruct((), jnp.float32))
    # The ring buffers live in the scan's carry and are updated in place, outside the
    # switch: a branch sees and returns one microbatch's worth of them (a conditional that
    # returned the whole buffers would copy them); only the gradient sums pass through it
    carry = {
        "act": zeros_varying(ring(slots["act"], x0)),
        "grad": zeros_varying(ring(slots["grad"], y0)),
        "stash": zeros_varying([ring(slots["stash"], s) for s in res_mid.shapes]),
        "stash_last": zeros_varying([ring(slots["stash_last"], s) for s in res_last.shapes]),
        "g_params": zeros_varying(jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, _accumulator(a.dtype)), params)),
        "g_head": zeros_varying(jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, _accumulator(a.dtype)), head)),
        "dx": jnp.zeros_like(xs), "loss": zero_loss, "stats": like(stats0),
        "busy": zeros_varying(jax.ShapeDtypeStruct((), jnp.int32)),
    }
    add = lambda a, b: jax.tree.map(lambda x_, y_: x_ + y_.astype(x_.dtype), a, b)  # noqa: E731

    def result(kept, kept_last, acc, **computed):
        """A branch's outputs: what it computed, zeros for the rest, except that the stash
        slots and gradient sums it does not change pass through (no zeros of their size)."""
        return {"y": like(y0), "new": kept, "new_last": kept_last, "acc": acc, "g_x": like(x0),
                "loss": zero_loss, "stats": like(stats0), **computed}

    def forward_mid(i, x_in, g_in, kept, kept_last, acc):
        y, vjp_fn, stats = jax.vjp(lambda p, x_: stage_fn(p, x_, ex_of(i)), params, x_in,
                                   has_aux=True)
        return result(kept, kept_last, acc, y=y, new=res_mid.split(vjp_fn, params),
                      stats=stats)

    def forward_last(i, x_in, g_in, kept, kept_last, acc):
        loss, vjp_fn, stats = jax.vjp(lambda a, x_: joint(a, x_, ex_of(i)), (params, head),
                                      x_in, has_aux=True)
        return result(kept, kept_last, acc, new_last=res_last.split(vjp_fn, (params, head)),
                      loss=loss.astype(jnp.float32), stats=stats)

    def backward_mid(i, x_in, g_in, kept, kept_last, acc):
        g_p, g_x = res_mid.join(kept, params)(g_in)
        return result(kept, kept_last, (add(acc[0], g_p), acc[1]), g_x=g_x)

    def backward_last(i, x_in, g_in, kept, kept_last, acc):
        one = jax.lax.pcast(jnp.ones((), jnp.float32), AXIS, to="varying")
        (g_p, g_h), g_x = res_last.join(kept_last, (params, head))(one)
        return result(kept, kept_last, (add(acc[0], g_p), add(acc[1], g_h)), g_x=g_x)

    def idle(i, x_in, g_in, kept, kept_last, acc):
        return result(kept, kept_last, acc)

    ops = jnp.asarray(table)
    up = [(s, s + 1) for s in range(stages - 1)]
    down = [(s + 1, s) for s in range(stages - 1)]

    def unit(c, t):
        op, i = _take(_take(ops, t), stage)
        is_f, is_b = op == FORWARD, op == BACKWARD
        i = jnp.maximum(i, 0)
        slot, slot_last = i % slots["stash"], i % slots["stash_last"]
        x_in = jnp.where(first, x_of(i), _take(c["act"], i % slots["act"]))
        g_in = _take(c["grad"], i % slots["grad"])
        kept = [_take(b, slot) for b in c["stash"]]
        kept_last = [_take(b, slot_last) for b in c["stash_last"]]
        branch = jnp.where(is_f, jnp.where(last, 1, 0), jnp.where(is_b, jnp.where(last, 3, 2), 4))
        r = jax.lax.switch(branch, [forward_mid, forward_last, backward_mid, backward_last,
                                    idle], i, x_in, g_in, kept, kept_last,
                           (c["g_params"], c["g_head"]))
        y, new, new_last, g_x = r["y"], r["new"], r["new_last"], r["g_x"]
        c = {**c, "loss": c["loss"] + r["loss"], "stats": add(c["stats"], r["stats"]),
             "g_params": r["acc"][0], "g_head": r["acc"][1],
             "busy": c["busy"] + (is_f | is_b).astype(jnp.int32),
             # (a branch that fills no slot returns what it read: writing it back is a no-op)
             "stash": [_put(b, slot, a) for b, a in zip(c["stash"], new)],
             "stash_last": [_put(b, slot_last, a) for b, a in zip(c["stash_last"], new_last)],
             "dx": _put(c["dx"], i, g_x.astype(c["dx"].dtype), is_b & first, axis=1)}
        # send: the forward's output up, the backward's input gradient down, with the
        # microbatch number (-1: nothing sent)
        send_f = jnp.where(is_f & ~last, i, -1)
        send_b = jnp.where(is_b & ~first, i, -1)
        act, act_mb = jax.lax.ppermute((y, send_f), AXIS, up)
        grad, grad_mb = jax.lax.ppermute((g_x, send_b), AXIS, down)
        if stages == 1:  # ppermute over no pairs: nothing arrives (both are -1)
            act_mb, grad_mb = send_f, send_b
        c["act"] = _put(c["act"], jnp.maximum(act_mb, 0) % slots["act"],
                        act.astype(c["act"].dtype), act_mb >= 0)
        c["grad"] = _put(c["grad"], jnp.maximum(grad_mb, 0) % slots["grad"],
                         grad.astype(c["grad"].dtype), grad_mb >= 0)
        return c, None

    c, _ = jax.lax.scan(unit, carry, jnp.arange(table.shape[0]))
    on = lambda tree, where: jax.tree.map(  # noqa: E731
        lambda a: jax.lax.psum(jnp.where(where, a, jnp.zeros_like(a)), AXIS), tree)
    dx = on(c["dx"], first)
    return (on(c["loss"], last), c["stats"],
            jax.tree.map(lambda a: a[None], c["g_params"]), on(c["g_head"], last),
            dx.reshape(x.shape), c["busy"][None])


def one_f_one_b(stage_fn, last_fn, stage_params, head_params, x, extras, *,
                microbatches: int, mesh=None):
    """Run the 1F1B schedule, forward and backward. stage_fn(params_of_one_stage, x_mb,
    extras_mb) -> (y, stats), y shaped like x; last_fn(head_params, y_mb, extras_mb) -> the
    microbatch's loss (a scalar that sums over its rows). stage_params: pytree with leading
    axis P; x (B, ...), extras (pytree of (B, ...)), B divisible by `microbatches`.

    Returns (loss, stats, grads, busy): loss summed over microbatches; stats summed over
    microbatches and concatenated over stages on their leading axis (as `gpipe`); grads =
    (d loss / d stage_params, d loss / d head_params, d loss / d x); busy (P,) the units each
    stage worked (2M of 2(M+P-1)).
    `pipeline_loss` wraps it for `jax.grad`."""
    mesh = pipeline_mesh(mesh, x, microbatches, "1F1B")
    body = functools.partial(_local, stage_fn=stage_fn, last_fn=last_fn,
                             microbatches=microbatches, stages=mesh.shape[AXIS])
    loss, stats, g_params, g_head, g_x, busy = jax.shard_map(
        body, mesh=mesh, in_specs=(P(AXIS), P(), P(), P()),
        out_specs=(P(), P(AXIS), P(AXIS), P(), P(), P(AXIS)), axis_names={AXIS})(
        stage_params, head_params, x, extras)
    return loss, stats, (g_params, g_head, g_x), busy


def pipeline_loss(stack_fn, last_fn, layers, head_params, x, extras, *, microbatches: int,
                  mesh=None):
    """The summed loss `last_fn(head_params, stack_fn(layers, x, extras)[0], extras)` (and
    stack_fn's stats, summed over microbatches, as `pipeline_layers` gives them), computed
    by the 1F1B schedule over the mesh's "stage" axis: stage p runs layers p L/P ..
    (p+1) L/P - 1. Differentiable in layers, head_params and x (a custom_vjp: the schedule
    computes the gradients in its forward)."""
    mesh = mesh if mesh is not None else sharding.context_mesh()
    stage_fn, head_fn = in_stage(stack_fn), in_stage(last_fn)

    def run(layers, head_params, x):
        by_stage = split_stages(layers, mesh)
        loss, stats, (g_l, g_h, g_x), _ = one_f_one_b(
            stage_fn, head_fn, by_stage, head_params, x, extras, microbatches=microbatches,
            mesh=mesh)
        g_l = jax.tree.map(lambda g, a: g.reshape(a.shape).astype(a.dtype), g_l, layers)
        g_h = jax.tree.map(lambda g, a: g.astype(a.dtype), g_h, head_params)
        return (loss, stats), (g_l, g_h, g_x)

    @jax.custom_vjp
    def loss_of(layers, head_params, x):
        return run(layers, head_params, x)[0]

    def fwd(layers, head_params, x):
        return run(layers, head_params, x)

    def bwd(grads, cotangents):
        g_loss = cotangents[0]
        return jax.tree.map(lambda g: (g * g_loss).astype(g.dtype), grads)

    loss_of.defvjp(fwd, bwd)
    return loss_of(layers, head_params, x)
