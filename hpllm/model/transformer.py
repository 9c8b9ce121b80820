"""A Llama-family decoder as pure functions over a parameter pytree.

Parameters are a nested dict; the per-layer weights are stacked on a leading `layers` axis so
the decoder runs as one `jax.lax.scan` (compile time independent of depth). Shapes, with
B batch, S sequence, D dim, H heads, K kv heads, Dh head dim, F ffn dim, V vocab, L layers:

    embed (V, D)                      pos_embed (max_seq_len, D)   [learned positions only]
    layers/attn_norm (L, D)           layers/wq (L, D, H, Dh)      layers/wk, wv (L, D, K, Dh)
    layers/wo (L, H, Dh, D)           layers/mlp_norm (L, D)
    layers/w_gate, w_up (L, D, F)     layers/w_down (L, F, D)
    final_norm (D,)                   unembed (D, V)               [untied output only]
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp

from hpllm.config import ModelConfig
from hpllm.model.attention import attention
from hpllm.model.layers import apply_rope, rms_norm, rope_angles, swiglu

# Every op of the attention call carries "attention" in its name stack (`hpllm profile`).
attention = jax.named_scope("attention")(attention)


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
    shapes = {"embed": (c.vocab_size, D), "layers": layers, "final_norm": (D,)}
    if c.pos_embedding == "learned":
        shapes["pos_embed"] = (c.max_seq_len, D)
    if not c.tie_embeddings:
        shapes["unembed"] = (D, c.vocab_size)
    return shapes


def init_params(config: ModelConfig, key, dtype=jnp.float32) -> dict:
    """Normal(0, init_std) matrices, unit norm weights; residual-output projections (wo,
    w_down) scaled by 1/sqrt(2 n_layers) so the residual stream's variance does not grow with
    depth (GPT-2). Each leaf draws from its own key folded from its path, so adding a
    parameter never changes the others. Pure: jit with out_shardings for sharded init."""
    residual_scale = 1.0 / math.sqrt(2 * config.n_layers)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(shape, dtype)
        subkey = jax.random.fold_in(key, _stable_hash(name))
        std = config.init_std * (residual_scale if ("wo" in name or "w_down" in name) else 1.0)
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


def init_cache(config: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """A dense KV cache: slot t of each row holds the key/value of position t."""
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _remat_policy(remat: str):
    if remat == "none":
        return None
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    if remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"unknown remat policy {remat!r}")


def forward(params, tokens, positions, config: ModelConfig, *, segment_ids=None, cache=None,
            dtype=jnp.float32, remat: str = "none", attn_impl: str | None = None):
    """Logits (B, S, V) in float32, and the updated cache (None when none was given).

    tokens, positions, segment_ids: (B, S) int. Without a cache, attention is causal within
    each segment of the given sequence (packed documents). With a cache, the new keys/values
    are written at slot = position and every query attends to the cache slots 0..its position.
    `dtype` is the compute dtype: parameters are cast to it here, so float32 master weights
    receive float32 gradients. Segment id 0 marks padding (never attended to).
    Inside jit nothing can be checked against data: positions must stay below max_seq_len
    (learned embeddings) and below the cache length (writes past it are dropped).
    """
    c = config
    attn_impl = attn_impl or c.attention
    window = c.attention_window or None
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache: "
                         "cache slots are indexed by position, which restarts per document")
    p = jax.tree.map(lambda w: w.astype(dtype), params)
    x = p["embed"][tokens]
    if c.pos_embedding == "learned":
        x = x + p["pos_embed"][positions]
        cos = sin = None
    else:
        cos, sin = rope_angles(positions, c.head_dim, c.rope_theta)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    batch_index = jnp.arange(tokens.shape[0])[:, None]

    def layer(carry, w):
        # The whole cache rides in the scan carry and each layer writes its new keys/values
        # into it in place: passing it as scanned input/output would copy all of it (every
        # layer, every context slot) on every decode step.
        x, full_cache, index = carry
        h = rms_norm(x, w["attn_norm"], c.norm_eps)
        q = jnp.einsum("bsd,dhk->bshk", h, w["wq"])
        k = jnp.einsum("bsd,dhk->bshk", h, w["wk"])
        v = jnp.einsum("bsd,dhk->bshk", h, w["wv"])
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if full_cache is None:
            out = attention(q, k, v, positions, positions, segment_ids, segment_ids, attn_impl,
                            window)
        else:
            full_cache = {
                name: full_cache[name].at[index, batch_index, positions].set(
                    new.astype(full_cache[name].dtype))
                for name, new in (("k", k), ("v", v))}
            ck, cv = full_cache["k"][index], full_cache["v"][index]
            kv_pos = jnp.broadcast_to(jnp.arange(ck.shape[1]), ck.shape[:2])
            out = attention(q, ck.astype(dtype), cv.astype(dtype), positions, kv_pos,
                            impl=attn_impl, window=window)
        x = x + jnp.einsum("bshk,hkd->bsd", out, w["wo"])
        h = rms_norm(x, w["mlp_norm"], c.norm_eps)
        x = x + swiglu(h, w["w_gate"], w["w_up"], w["w_down"])
        return (x, full_cache, index + 1), None

    policy = _remat_policy(remat)
    if remat != "none":
        layer = jax.checkpoint(layer, policy=policy)
    if isinstance(p["layers"], (list, tuple)):  # unstacked (see unstack_layers): unrolled
        carry = (x, cache, 0)
        for w in p["layers"]:
            carry, _ = layer(carry, w)
        x, new_cache, _ = carry
    else:
        (x, new_cache, _), _ = jax.lax.scan(layer, (x, cache, jnp.int32(0)), p["layers"])
    x = rms_norm(x, p["final_norm"], c.norm_eps)
    if c.tie_embeddings:  # contract with the (V, D) table as stored: a .T here made XLA:CPU
        # copy the transposed table on every call (the whole matrix, each decode step)
        logits = jnp.einsum("bsd,vd->bsv", x, p["embed"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("bsd,dv->bsv", x, p["unembed"], preferred_element_type=jnp.float32)
    return logits, new_cache
