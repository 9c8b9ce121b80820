"""Mixture-of-experts MLP: router, top-k, capacity, dispatch/combine, expert parallelism.

A router (D, E) scores each token; softmax over the E experts; each token goes to its top k.
Combine weights: the top-k probabilities renormalised to sum to 1 (Mixtral). With k = 1 that
would make every weight 1 and give the router no gradient from the loss, so k = 1 keeps the
raw probability (Switch Transformer).

Capacity. Tokens are routed in groups, one group per sequence (batch row): each expert takes
at most C = ceil(capacity_factor * S * k / E) tokens of a group (capacity_factor 0: C = S,
nothing is ever dropped). Slots are filled in GShard's priority order, every token's first
choice before any second choice, then in token order. A (token, expert) assignment over
capacity is dropped: it adds nothing, and a token whose every choice was dropped passes
through on the residual alone. Groups are rows so that which tokens drop does not depend on
how the batch is split over devices (1 device, data parallel and expert parallel agree).

Load balancing (Switch's loss, GShard's groups): aux = E * sum_e f_e * P_e for each group
(row), with f_e the fraction of the row's routing assignments (before capacity) that chose
expert e and P_e the row's mean router probability of e; 1 when perfectly balanced. It is
averaged over the rows and the layers. Per row, because capacity is per row: a batch whose
every row sends all its tokens to one expert, a different one per row, balances over the
batch (a batch-wide aux of 1) while dropping 3/4 of the assignments at E/k = 4.

The router computes in float32 whatever the compute dtype (Switch's selective precision):
near-ties between experts decide top-k.

Dispatch is by index (gather x into an (G, E, C, D) buffer), not by the one-hot (G, S, E, C)
einsum of GShard, whose FLOPs grow with S^2; the gathers are per row (vmap), which the
partitioner keeps local when rows are split over devices. Expert parallelism (`moe_mlp`
under a mesh with an "expert" axis > 1): tokens stay split by rows; each device routes its
own rows, and two sharding constraints move the (G, E, C, D) buffer from "rows split over
data x fsdp x expert" to "rows over data x fsdp, experts over expert" and back, which the
partitioner (GSPMD/Shardy) implements as one all-to-all each way (the compiled step holds
them; tested). Annotations rather than a nested `shard_map`, so the layer also runs inside
a pipeline stage, where "stage" is already manual: jax 0.10.2 cannot differentiate a
shard_map nested in another one there (docs/perf/nested_shard_map_grad.py).

`dense_moe_reference` runs every expert on every token and masks by the routing: the slow,
obviously-correct twin (no capacity) that the tests compare against.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from hpllm.parallel.sharding import context_mesh

# Mesh axes the tokens (batch rows) are split over around the experts: the expert axis
# doubles as a data-parallel axis outside the experts (GShard).
BATCH_AXES = ("data", "fsdp", "expert")


def capacity(group_size: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert per group; capacity_factor <= 0 means dropless (C = group size)."""
    if capacity_factor <= 0:
        return group_size
    return min(group_size, math.ceil(capacity_factor * group_size * k / n_experts))


def route(x, router_w, k: int):
    """Router probabilities (G, S, E) float32, top-k experts (G, S, k) and combine weights."""
    logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32), router_w.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_e = jax.lax.top_k(probs, k)
    weights = top_p / top_p.sum(-1, keepdims=True) if k > 1 else top_p
    return probs, top_e, weights


def expert_slots(top_e, n_experts: int, cap: int):
    """Slot of each assignment in its expert's buffer, (G, S, k), and whether it fits (< cap).

    Priority: all first choices of the group, in token order, then all second choices, ...
    """
    g, s, k = top_e.shape
    order = top_e.transpose(0, 2, 1).reshape(g, k * s)  # choice-major
    onehot = jax.nn.one_hot(order, n_experts, dtype=jnp.int32)  # (G, kS, E)
    before = jnp.cumsum(onehot, axis=1) - onehot  # earlier assignments to the same expert
    pos = (before * onehot).sum(-1).reshape(g, k, s).transpose(0, 2, 1)
    return pos, pos < cap


@functools.partial(jax.vmap, in_axes=(0, 0, 0, 0, None, None))
def dispatch(x, top_e, pos, kept, n_experts: int, cap: int):
    """Gather tokens into per-expert buffers (G, E, C, D); empty slots hold zeros."""
    s = x.shape[0]
    tokens = jnp.broadcast_to(jnp.arange(s)[:, None], top_e.shape)
    # slot -> token it holds (s = the zero row appended below when the slot stays empty);
    # dropped assignments aim at slot `cap`, out of bounds, and mode="drop" discards them.
    slot_token = jnp.full((n_experts, cap), s, jnp.int32)
    slot_token = slot_token.at[top_e, jnp.where(kept, pos, cap)].set(tokens, mode="drop")
    return jnp.concatenate([x, jnp.zeros((1, x.shape[-1]), x.dtype)])[slot_token]


@jax.vmap
def combine(expert_out, top_e, pos, kept, weights):
    """Weighted sum of each token's expert outputs (G, S, D); dropped assignments add 0."""
    picked = expert_out[top_e, jnp.minimum(pos, expert_out.shape[1] - 1)]  # (S, k, D)
    w = jnp.where(kept, weights, 0.0).astype(expert_out.dtype)
    return jnp.einsum("skd,sk->sd", picked, w)


def expert_ffn(xe, w_gate, w_up, w_down):
    """Each expert's SwiGLU on its own buffer: xe (G, E, C, D), weights (E, D, F) / (E, F, D)."""
    gate = jnp.einsum("gecd,edf->gecf", xe, w_gate)
    up = jnp.einsum("gecd,edf->gecf", xe, w_up)
    return jnp.einsum("gecf,efd->gecd", jax.nn.silu(gate) * up, w_down)


def routing_stats(probs, top_e, kept, n_experts: int) -> dict:
    """Sums over the rows; they add across devices and microbatches. "balance": the rows'
    summed E * sum_e f_e P_e (the load-balancing loss before averaging)."""
    chosen = jax.nn.one_hot(top_e, n_experts, dtype=jnp.float32).sum(2)  # (G, S, E)
    f, p = chosen.mean(1) / top_e.shape[2], probs.mean(1)  # per row (G, E)
    return {"expert_tokens": chosen.sum((0, 1)), "expert_prob": probs.sum((0, 1)),
            "balance": n_experts * (f * p).sum(), "rows": jnp.float32(top_e.shape[0]),
            "dropped": (~kept).sum().astype(jnp.int32)}


def _expert_mesh():
    """The context mesh (inside a pipeline stage: its abstract mesh, "stage" manual) when it
    has an "expert" axis > 1."""
    mesh = context_mesh()
    if mesh is None or mesh.shape.get("expert", 1) == 1:
        return None
    return mesh


def _pin_rows(mesh):
    """a -> a with its leading (row) axis split over the batch axes of `mesh` and, with
    `experts`, its second (expert) axis over "expert" (the rows then over the others)."""
    rows = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    by_expert = tuple(a for a in rows if a != "expert") or None

    def pin(a, experts: bool = False):
        spec = P(by_expert, "expert") if experts else P(rows)
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))
    return rows, pin


def moe_mlp(x, w, config):
    """MoE MLP of one layer: x (B, S, D), w {"router" (D, E), "w_gate", "w_up" (E, D, F),
    "w_down" (E, F, D)} -> (B, S, D) and routing stats (sums over the batch).

    Under a mesh with axis "expert" > 1 (`jax.set_mesh`, the training step's rules, or a
    pipeline stage) it runs expert parallel: rows split over the data/fsdp/expert axes,
    experts over "expert", an all-to-all each way."""
    e, k = config.n_experts, config.experts_per_token
    mesh = _expert_mesh()
    pin = lambda a, experts=False: a  # noqa: E731 (one device: nothing to place)
    if mesh is not None:
        rows, pin = _pin_rows(mesh)
        n_rows = math.prod(mesh.shape[a] for a in rows)
        if x.shape[0] % n_rows or e % mesh.shape["expert"]:
            raise ValueError(f"expert parallelism over {dict(mesh.shape)} needs the batch "
                             f"({x.shape[0]}) divisible by {n_rows} and n_experts ({e}) by "
                             f"{mesh.shape['expert']}")
    x = pin(x)
    cap = capacity(x.shape[1], e, k, config.capacity_factor)
    probs, top_e, weights = route(x, w["router"], k)
    pos, kept = expert_slots(top_e, e, cap)
    xe = pin(pin(dispatch(x, top_e, pos, kept, e, cap)), experts=True)  # all-to-all
    ye = pin(pin(expert_ffn(xe, w["w_gate"], w["w_up"], w["w_down"]), experts=True))  # back
    return combine(ye, top_e, pos, kept, weights), routing_stats(probs, top_e, kept, e)


def load_balancing_loss(stats: dict):
    """The aux loss from stats stacked over layers: each row's E * sum_e f_e P_e, averaged
    over the rows and the layers (1 when every row is balanced)."""
    return (stats["balance"] / jnp.maximum(stats["rows"], 1.0)).mean()


def expert_load(stats: dict):
    """Each layer's share of the routing assignments per expert (L, E), before capacity;
    1/E each when balanced."""
    counts = stats["expert_tokens"]
    return counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)


def dropped_fraction(stats: dict):
    """Dropped (token, expert) assignments over all assignments, all layers."""
    return stats["dropped"].sum() / jnp.maximum(stats["expert_tokens"].sum(), 1.0)


def dense_moe_reference(x, w, config):
    """Every expert on every token, weighted by the routing (zero for unchosen experts): the
    dropless MoE, written without dispatch. x (B, S, D) -> (B, S, D)."""
    e, k = config.n_experts, config.experts_per_token
    _, top_e, weights = route(x, w["router"], k)
    gate = jnp.einsum("bsd,edf->bsef", x, w["w_gate"])
    up = jnp.einsum("bsd,edf->bsef", x, w["w_up"])
    out = jnp.einsum("bsef,efd->bsed", jax.nn.silu(gate) * up, w["w_down"])
    mix = (jax.nn.one_hot(top_e, e, dtype=weights.dtype) * weights[..., None]).sum(-2)
    return jnp.einsum("bsed,bse->bsd", out, mix.astype(out.dtype))
