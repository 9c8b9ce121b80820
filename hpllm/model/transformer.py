"""A Llama-family decoder as pure functions over a parameter pytree.

Parameters are a nested dict; the per-layer weights are stacked on a leading `layers` axis so
the decoder runs as one `jax.lax.scan` (compile time independent of depth). Shapes, with
B batch, S sequence, D dim, H heads, K kv heads, Dh head dim, F ffn dim, V vocab, L layers:

    embed (V, D)                      pos_embed (max_seq_len, D)   [learned positions only]
    layers/attn_norm (L, D)           layers/wq (L, D, H, Dh)      layers/wk, wv (L, D, K, Dh)
    layers/wo (L, H, Dh, D)           layers/mlp_norm (L, D)
    layers/w_gate, w_up (L, D, F)     layers/w_down (L, F, D)
    final_norm (D,)                   unembed (D, V)               [untied output only]

`forward` = `embed` -> `decoder_stack` -> `head`; the KV caches it reads and writes are in
hpllm/model/kv_cache.py.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp

from hpllm.config import ModelConfig
from hpllm.model.attention import attention
from hpllm.model.layers import apply_rope, rms_norm, rope_angles, swiglu
from hpllm.model.moe import moe_mlp
from hpllm.parallel.sharding import constrain  # identity unless a sharded step is traced
from hpllm.parallel.tensor_parallel import column_parallel, row_parallel
from hpllm.quantized import cast_params, embed_lookup, project


def param_axes(config: ModelConfig) -> dict:
    """Logical axis names of every parameter (same tree as init_params); the sharding rules
    map these names to mesh axes."""
    layers = {
        "attn_norm": ("layers", "embed"),
        "wq": ("layers", "embed", "heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "embed"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    if config.n_experts:  # the MLP is a mixture of experts (hpllm/model/moe.py)
        del layers["w_gate"], layers["w_up"], layers["w_down"]
        layers["moe"] = {"router": ("layers", "embed", None),
                         "w_gate": ("layers", "experts", "embed", "mlp"),
                         "w_up": ("layers", "experts", "embed", "mlp"),
                         "w_down": ("layers", "experts", "mlp", "embed")}
    axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("embed",)}
    if config.pos_embedding == "learned":
        axes["pos_embed"] = ("seq", "embed")
    if not config.tie_embeddings:
        axes["unembed"] = ("embed", "vocab")
    return axes


def param_shapes(config: ModelConfig) -> dict:
    c = config
    L, D, H, K, Dh, F = c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim
    layers = {
        "attn_norm": (L, D), "wq": (L, D, H, Dh), "wk": (L, D, K, Dh), "wv": (L, D, K, Dh),
        "wo": (L, H, Dh, D), "mlp_norm": (L, D),
        "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
    }
    if c.n_experts:  # E experts of F hidden units each replace the dense MLP
        E = c.n_experts
        del layers["w_gate"], layers["w_up"], layers["w_down"]
        layers["moe"] = {"router": (L, D, E), "w_gate": (L, E, D, F), "w_up": (L, E, D, F),
                         "w_down": (L, E, F, D)}
    shapes = {"embed": (c.vocab_size, D), "layers": layers, "final_norm": (D,)}
    if c.pos_embedding == "learned":
        shapes["pos_embed"] = (c.max_seq_len, D)
    if not c.tie_embeddings:
        shapes["unembed"] = (D, c.vocab_size)
    return shapes


def init_params(config: ModelConfig, key, dtype=jnp.float32) -> dict:
    """Normal(0, init_std) matrices, unit norm weights; residual-output projections (wo,
    w_down) scaled by 1/sqrt(2 n_layers) so the residual stream's variance does not grow with
    depth (GPT-2); the MoE router 1/sqrt(dim) (fan-in), so routing starts decided by each
    token rather than by near-ties (hpllm/model/moe.py). Each leaf draws from its own key
    folded from its path, so adding a parameter never changes the others. Pure: jit with
    out_shardings for sharded init."""
    residual_scale = 1.0 / math.sqrt(2 * config.n_layers)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(shape, dtype)
        subkey = jax.random.fold_in(key, _stable_hash(name))
        std = config.init_std * (residual_scale if ("wo" in name or "w_down" in name) else 1.0)
        if "router" in name:  # fan-in scale: logits ~ N(0, 1), not near-uniform (moe.py)
            std = 1.0 / math.sqrt(config.dim)
        return (std * jax.random.normal(subkey, shape, jnp.float32)).astype(dtype)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(config),
                                            is_leaf=lambda x: isinstance(x, tuple))


def _stable_hash(name: str) -> int:
    # Python's hash() is salted per process; crc32 keeps init reproducible across runs.
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def count_params(config: ModelConfig, embedding: bool = True) -> int:
    """Parameter count; embedding=False leaves out the token (and position) embedding table
    but keeps the output projection, which is a real matmul even when tied."""
    shapes = jax.tree.leaves(param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    total = sum(math.prod(s) for s in shapes)
    if not embedding:
        total -= config.vocab_size * config.dim
        if config.pos_embedding == "learned":
            total -= config.max_seq_len * config.dim
        if config.tie_embeddings:
            total += config.vocab_size * config.dim
    return total


def unstack_layers(params: dict) -> dict:
    """The same parameters with `layers` as a list of per-layer trees, for decoding.

    `forward` then unrolls the layers instead of scanning them. A scan reads each layer's
    weights as a dynamic slice of the stacked arrays, which XLA:CPU copies before the
    mat-vec: measured on SmolLM2-135M's MLP weights, 11.9 GB/s scanned vs 17.9 GB/s from
    separate arrays. Training keeps the stacked form (one compiled layer, fast compiles).
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]}


def _remat_policy(remat: str):
    if remat == "none":
        return None
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    if remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"unknown remat policy {remat!r}")


# ------------------------------------------------------------------ the model, in three pieces
# forward = embed -> decoder_stack -> head. Callers that need a piece alone call it directly:
# pipeline stages run a slice of the stack, training reads the stack's MoE routing sums,
# early exit runs the stack in segments and the head at each exit point.

def embed(params, tokens, positions, config: ModelConfig, dtype=jnp.float32):
    """Token (and learned position) embeddings (B, S, D) in the compute dtype `dtype`."""
    x = embed_lookup(cast_params(params["embed"], dtype), tokens, dtype)
    if config.pos_embedding == "learned":
        x = x + cast_params(params["pos_embed"], dtype)[positions]
    return x


def decoder_stack(layers, x, positions, config: ModelConfig, *, cache=None, segment_ids=None,
                  remat: str = "none"):
    """The decoder layers over the residual stream x (B, S, D); computes in x's dtype (the
    layer weights are cast to it here, so float32 master weights get float32 gradients).

    layers: stacked (leading axis L: one `lax.scan`) or a list of per-layer trees (unrolled;
    see unstack_layers). positions (B, S) int. Without a cache, attention is causal within
    each segment of segment_ids (packed documents; id 0 marks padding, never attended to).
    With a cache (hpllm.model.kv_cache), layer i writes its keys/values at the positions and
    attends over cache layer i. remat: "none", "full" or "dots" (per-layer rematerialisation).
    Returns (x, the updated cache or None, MoE routing sums stacked over layers or None).
    """
    c = config
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache: "
                         "cache slots are indexed by position, which restarts per document")
    layers = cast_params(layers, x.dtype)  # quantized weights stay quantized
    window = c.attention_window or None
    rope = None if c.pos_embedding == "learned" else rope_angles(positions, c.head_dim,
                                                                 c.rope_theta)
    if segment_ids is None:
        segment_ids = jnp.ones(positions.shape, jnp.int32)

    ring = c.collective_matmul == "ring"  # tensor-parallel projections as ring collective
    # matmuls where sharding rules split the sequence (hpllm/parallel/tensor_parallel.py)

    def layer(carry, w):
        # The whole cache rides in the scan carry and each layer writes its new keys/values
        # into it in place: passing it as scanned input/output would copy all of it (every
        # layer, every context slot) on every decode step.
        x, cache, index = carry
        x = constrain(x, ("batch", "seq", "embed"))  # the residual stream between blocks
        h = rms_norm(x, w["attn_norm"], c.norm_eps)
        q, k, v = column_parallel(h, (w["wq"], w["wk"], w["wv"]), "bsd,dhk->bshk", ring=ring,
                                  project=project)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            cache = cache.update(index, k, v, positions)
        # Every op of attention carries "attention" in its name stack (`hpllm profile`).
        with jax.named_scope("attention"):
            if cache is None:
                out = attention(q, k, v, positions, positions, segment_ids, segment_ids,
                                c.attention, window)
            else:
                out = cache.attend(index, q, positions, c.attention, window)
        x = x + row_parallel(out, w["wo"], "bshk,hkd->bsd", ring=ring, project=project)
        x = constrain(x, ("batch", "seq", "embed"))
        h = rms_norm(x, w["mlp_norm"], c.norm_eps)
        if c.n_experts:  # routing sums leave the scan as its per-layer outputs
            y, stats = moe_mlp(h, w["moe"], c)
            return (x + y, cache, index + 1), stats
        x = x + swiglu(h, w["w_gate"], w["w_up"], w["w_down"], ring=ring)
        return (x, cache, index + 1), None

    if remat != "none":
        layer = jax.checkpoint(layer, policy=_remat_policy(remat))
    if isinstance(layers, (list, tuple)):  # unstacked (see unstack_layers): unrolled
        carry, per_layer = (x, cache, 0), []
        for w in layers:
            carry, stats = layer(carry, w)
            per_layer.append(stats)
        x, cache, _ = carry
        stats = jax.tree.map(lambda *s: jnp.stack(s), *per_layer) if c.n_experts else None
    else:
        (x, cache, _), stats = jax.lax.scan(layer, (x, cache, jnp.int32(0)), layers)
    return x, cache, stats


def head(params, x, config: ModelConfig, logits_at=None):
    """Final norm and output projection: logits (B, S, V) in float32, computed in x's dtype.
    logits_at (B,) int: only the logits at that index of each row, (B, V), so a prefill
    chunk does not project every position onto the vocabulary."""
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
    x = rms_norm(x, params["final_norm"].astype(x.dtype), config.norm_eps)
    if config.tie_embeddings:  # contract with the (V, D) table as stored: a .T here made
        # XLA:CPU copy the transposed table on every call (the whole matrix, each decode step)
        logits = project(x, cast_params(params["embed"], x.dtype), "...d,vd->...v",
                         preferred_element_type=jnp.float32)
    else:
        logits = project(x, cast_params(params["unembed"], x.dtype), "...d,dv->...v",
                         preferred_element_type=jnp.float32)
    if logits.ndim == 3:  # vocab-parallel logits under tensor parallelism
        logits = constrain(logits, ("batch", None, "vocab"))
    return logits


def forward(params, tokens, positions, config: ModelConfig, *, cache=None, segment_ids=None,
            logits_at=None, dtype=jnp.float32):
    """embed -> decoder_stack -> head: (logits (B, S, V) float32, the updated cache or None).

    tokens, positions, segment_ids: (B, S) int; cache: a DenseKVCache or PagedKVCache
    (hpllm.model.kv_cache) or None; logits_at: see `head`. `dtype` is the compute dtype:
    parameters are cast to it inside, so float32 master weights receive float32 gradients.
    The attention implementation is config.attention. Training's remat and MoE routing sums
    go through the pieces (hpllm.train.step.token_nll). Inside jit nothing can be checked
    against data: positions must stay below max_seq_len (learned embeddings) and inside the
    cache (writes past it are dropped).
    """
    x = embed(params, tokens, positions, config, dtype)
    x, cache, _ = decoder_stack(params["layers"], x, positions, config, cache=cache,
                                segment_ids=segment_ids)
    return head(params, x, config, logits_at), cache
