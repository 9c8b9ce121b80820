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

Load balancing (Switch): aux = E * sum_e f_e * P_e per layer, with f_e the fraction of the
batch's routing assignments (before capacity) that chose expert e and P_e the mean router
probability of e; 1 when perfectly balanced. The layers' values are averaged.

Dispatch is by index (gather x into an (G, E, C, D) buffer), not by the one-hot (G, S, E, C)
einsum of GShard, whose FLOPs grow with S^2. Expert parallelism (`moe_mlp` under a mesh
with an "expert" axis > 1): tokens stay sharded by batch; each device routes its own rows,
`all_to_all` sends every expert's slots to the device that owns the expert, the local experts
run, and a second `all_to_all` brings the results back.

`dense_moe_reference` runs every expert on every token and masks by the routing: the slow,
obviously-correct twin (no capacity) that the tests compare against.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hpllm.parallel.sharding import context_mesh

# Mesh axes the tokens (batch rows) are split over inside the expert-parallel layer: the
# expert axis doubles as a data-parallel axis outside the experts (GShard).
BATCH_AXES = ("data", "fsdp", "expert")


def capacity(group_size: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert per group; capacity_factor <= 0 means dropless (C = group size)."""
    if capacity_factor <= 0:
        return group_size
    return min(group_size, math.ceil(capacity_factor * group_size * k / n_experts))


def route(x, router_w, k: int):
    """Router probabilities (G, S, E) float32, top-k experts (G, S, k) and combine weights."""
    logits = jnp.einsum("gsd,de->gse", x, router_w, preferred_element_type=jnp.float32)
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


def dispatch(x, top_e, pos, kept, n_experts: int, cap: int):
    """Gather tokens into per-expert buffers (G, E, C, D); empty slots hold zeros."""
    g, s, _ = x.shape
    rows = jnp.arange(g)[:, None, None]
    tokens = jnp.broadcast_to(jnp.arange(s)[None, :, None], top_e.shape)
    # slot -> token it holds (s = the zero row appended below when the slot stays empty);
    # dropped assignments aim at slot `cap`, out of bounds, and mode="drop" discards them.
    slot_token = jnp.full((g, n_experts, cap), s, jnp.int32)
    slot_token = slot_token.at[rows, top_e, jnp.where(kept, pos, cap)].set(tokens, mode="drop")
    x_pad = jnp.concatenate([x, jnp.zeros((g, 1, x.shape[-1]), x.dtype)], axis=1)
    return x_pad[rows, slot_token]


def combine(expert_out, top_e, pos, kept, weights):
    """Weighted sum of each token's expert outputs (G, S, D); dropped assignments add 0."""
    g = expert_out.shape[0]
    rows = jnp.arange(g)[:, None, None]
    picked = expert_out[rows, top_e, jnp.minimum(pos, expert_out.shape[2] - 1)]  # (G, S, k, D)
    w = jnp.where(kept, weights, 0.0).astype(expert_out.dtype)
    return jnp.einsum("gskd,gsk->gsd", picked, w)


def expert_ffn(xe, w_gate, w_up, w_down):
    """Each expert's SwiGLU on its own buffer: xe (G, E, C, D), weights (E, D, F) / (E, F, D)."""
    gate = jnp.einsum("gecd,edf->gecf", xe, w_gate)
    up = jnp.einsum("gecd,edf->gecf", xe, w_up)
    return jnp.einsum("gecf,efd->gecd", jax.nn.silu(gate) * up, w_down)


def routing_stats(probs, top_e, kept, n_experts: int) -> dict:
    """Sums over this device's tokens; they add across devices and microbatches."""
    return {"expert_tokens": jax.nn.one_hot(top_e, n_experts, dtype=jnp.float32).sum((0, 1, 2)),
            "expert_prob": probs.sum((0, 1)),
            "dropped": (~kept).sum().astype(jnp.int32)}


def _moe_local(x, w, config, expert_axis: str | None = None):
    """The MoE MLP on this device's rows; with expert_axis, w holds only the local experts."""
    e, k = config.n_experts, config.experts_per_token
    cap = capacity(x.shape[1], e, k, config.capacity_factor)
    probs, top_e, weights = route(x, w["router"], k)
    pos, kept = expert_slots(top_e, e, cap)
    xe = dispatch(x, top_e, pos, kept, e, cap)
    if expert_axis is not None:  # (G, E, C, D) -> (n G, E/n, C, D): my experts, all rows
        xe = jax.lax.all_to_all(xe, expert_axis, 1, 0, tiled=True)
    ye = expert_ffn(xe, w["w_gate"], w["w_up"], w["w_down"])
    if expert_axis is not None:
        ye = jax.lax.all_to_all(ye, expert_axis, 0, 1, tiled=True)
    return combine(ye, top_e, pos, kept, weights), routing_stats(probs, top_e, kept, e)


def _expert_mesh():
    """The context mesh when it has an "expert" axis > 1 that is not already manual."""
    mesh = context_mesh()
    if mesh is None or mesh.shape.get("expert", 1) == 1:
        return None
    return mesh


def moe_mlp(x, w, config):
    """MoE MLP of one layer: x (B, S, D), w {"router" (D, E), "w_gate", "w_up" (E, D, F),
    "w_down" (E, F, D)} -> (B, S, D) and routing stats (sums over the batch).

    Under `jax.set_mesh(mesh)` with mesh axis "expert" > 1 it runs expert parallel: rows
    split over the data/fsdp/expert axes, experts over "expert", two all-to-alls."""
    mesh = _expert_mesh()
    if mesh is None:
        return _moe_local(x, w, config)
    if jax.sharding.get_abstract_mesh().manual_axes:  # e.g. inside a GPipe stage
        # Shardy rejects the gradient of a shard_map nested in another one here (jax 0.10.2)
        raise ValueError("expert parallelism inside a pipeline stage is not supported: "
                         "use mesh expert=1 with stage > 1")
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    n_rows = math.prod(mesh.shape[a] for a in axes)
    if x.shape[0] % n_rows or config.n_experts % mesh.shape["expert"]:
        raise ValueError(f"expert parallelism over {dict(mesh.shape)} needs the batch "
                         f"({x.shape[0]}) divisible by {n_rows} and n_experts "
                         f"({config.n_experts}) by {mesh.shape['expert']}")

    def body(x, w):
        y, stats = _moe_local(x, w, config, expert_axis="expert")
        return y, jax.lax.psum(stats, axes)

    experts = P("expert")
    specs = {"router": P(), "w_gate": experts, "w_up": experts, "w_down": experts}
    return jax.shard_map(body, mesh=mesh, in_specs=(P(axes), specs),
                         out_specs=(P(axes), P()), axis_names=set(axes))(x, w)


def load_balancing_loss(stats: dict):
    """Switch's aux loss from stats stacked over layers ((L, E) sums): E * sum_e f_e P_e,
    averaged over the layers."""
    counts, prob = stats["expert_tokens"], stats["expert_prob"]
    e = counts.shape[-1]
    assignments = counts.sum(-1, keepdims=True)  # tokens * k
    tokens = jnp.maximum(prob.sum(-1, keepdims=True), 1.0)  # probabilities sum to 1 per token
    return (e * (counts / jnp.maximum(assignments, 1.0)) * (prob / tokens)).sum(-1).mean()


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
