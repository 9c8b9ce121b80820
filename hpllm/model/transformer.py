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

from hpllm.compress.quantize import (cast_params, dequantize_kv, embed_lookup, project,
                                     quantize_kv)
from hpllm.config import ModelConfig
from hpllm.model.attention import attention
from hpllm.model.layers import apply_rope, rms_norm, rope_angles, swiglu
from hpllm.model.moe import moe_mlp
from hpllm.parallel.sharding import constrain  # identity unless a sharded step is traced

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


def init_cache(config: ModelConfig, batch: int, length: int, dtype=jnp.float32,
               kv_dtype: str | None = None) -> dict:
    """A dense KV cache: slot t of each row holds the key/value of position t.
    kv_dtype="int8": int8 keys/values with a float32 scale per token per head
    (hpllm.compress.quantize.quantize_kv), 68 instead of 256 bytes per f32 head of 64."""
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    if kv_dtype == "int8":
        return {"k": jnp.zeros(shape, jnp.int8), "v": jnp.zeros(shape, jnp.int8),
                "k_scale": jnp.ones(shape[:-1]), "v_scale": jnp.ones(shape[:-1])}
    if kv_dtype not in (None, "float"):
        raise ValueError(f"kv_dtype must be None (the compute dtype) or 'int8', got {kv_dtype!r}")
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _remat_policy(remat: str):
    if remat == "none":
        return None
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    if remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"unknown remat policy {remat!r}")


def _paged_attention_step(q, k, v, cache, layer, positions, window):
    """Write this step's keys/values into the paged pool through the block tables, then
    attend through them (hpllm.kernels.paged_attention). Padding tokens (position -1) write
    into the reserved null block 0, which no visible slot maps to."""
    from hpllm.kernels.paged_attention import paged_attention

    block_size = cache["k"][layer].shape[1]
    tables = cache["block_tables"]
    valid = positions >= 0
    safe = jnp.where(valid, positions, 0)
    blocks = jnp.where(valid, jnp.take_along_axis(tables, safe // block_size, axis=1), 0)
    offsets = jnp.where(valid, safe % block_size, 0)
    quantized = "k_scale" in cache  # int8 pool: codes + a float32 scale per token per head

    def write(name, value):
        # A pool given as a list of per-layer arrays (unrolled layers) is written in place
        # per layer; slicing a layer out of one stacked pool array would copy the whole
        # layer's pool (every block, not just this batch's) on every step.
        pool = cache[name]
        if isinstance(pool, list):
            pool = list(pool)
            pool[layer] = pool[layer].at[blocks, offsets].set(value.astype(pool[layer].dtype))
            return pool
        return pool.at[layer, blocks, offsets].set(value.astype(pool.dtype))

    updates = {}
    for name, new in (("k", k), ("v", v)):
        if quantized:
            new, scale = quantize_kv(new)
            updates[name + "_scale"] = write(name + "_scale", scale)
        updates[name] = write(name, new)
    cache = {**cache, **updates}
    if not quantized:
        out = paged_attention(q, cache["k"][layer], cache["v"][layer], tables, positions,
                              window=window)
        return out, cache
    # Dequantize only the blocks these rows use (never the whole pool), then attend through
    # an identity table over the gathered copy.
    b, m = tables.shape
    k_pages, v_pages = (
        dequantize_kv(cache[name][layer][tables], cache[name + "_scale"][layer][tables],
                      q.dtype).reshape(b * m, *cache[name][layer].shape[1:])
        for name in ("k", "v"))
    identity = jnp.arange(b * m, dtype=tables.dtype).reshape(b, m)
    out = paged_attention(q, k_pages, v_pages, identity, positions, window=window)
    return out, cache


def forward(params, tokens, positions, config: ModelConfig, *, segment_ids=None, cache=None,
            dtype=jnp.float32, remat: str = "none", attn_impl: str | None = None,
            logits_at=None, hidden=None, output_hidden: bool = False, moe_stats: bool = False):
    """Logits (B, S, V) in float32, and the updated cache (None when none was given).

    tokens, positions, segment_ids: (B, S) int. Without a cache, attention is causal within
    each segment of the given sequence (packed documents). With a cache, the new keys/values
    are written at slot = position and every query attends to the cache slots 0..its position.
    A paged cache (hpllm.infer.engine) is {"k", "v": (L, blocks, block_size, K, Dh) or a
    list of L (blocks, block_size, K, Dh) arrays (unrolled layers only), "block_tables": (B, M)}: position p of row b lives in block block_tables[b, p // size];
    position -1 marks a padding token.
    `dtype` is the compute dtype: parameters are cast to it here, so float32 master weights
    receive float32 gradients. Segment id 0 marks padding (never attended to).
    logits_at (B,) int: return only the logits at that index of each row, (B, V), so
    a prefill chunk does not project every position onto the vocabulary.
    Inside jit nothing can be checked against data: positions must stay below max_seq_len
    (learned embeddings) and below the cache length (writes past it are dropped).
    Pipeline stages (hpllm/parallel/pipeline.py) run a slice of the layers: `hidden` (B, S, D)
    replaces the embedding of `tokens`, and `output_hidden=True` returns the residual stream
    instead of logits. `moe_stats=True` appends a third result: the mixture-of-experts routing
    sums stacked over layers (hpllm.model.moe.routing_stats; None for a dense model).
    """
    c = config
    attn_impl = attn_impl or c.attention
    window = c.attention_window or None
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache: "
                         "cache slots are indexed by position, which restarts per document")
    p = cast_params(params, dtype)  # quantized weights stay quantized (compress/quantize.py)
    x = embed_lookup(p["embed"], tokens, dtype) if hidden is None else hidden.astype(dtype)
    if c.pos_embedding == "learned":
        x = x + p["pos_embed"][positions] if hidden is None else x
        cos = sin = None
    else:
        cos, sin = rope_angles(positions, c.head_dim, c.rope_theta)
    if segment_ids is None:
        segment_ids = jnp.ones(positions.shape, jnp.int32)
    batch_index = jnp.arange(positions.shape[0])[:, None]

    def layer(carry, w):
        # The whole cache rides in the scan carry and each layer writes its new keys/values
        # into it in place: passing it as scanned input/output would copy all of it (every
        # layer, every context slot) on every decode step.
        x, full_cache, index = carry
        x = constrain(x, ("batch", "seq", "embed"))  # the residual stream between blocks
        h = rms_norm(x, w["attn_norm"], c.norm_eps)
        q = project(h, w["wq"], "bsd,dhk->bshk")
        k = project(h, w["wk"], "bsd,dhk->bshk")
        v = project(h, w["wv"], "bsd,dhk->bshk")
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if full_cache is None:
            out = attention(q, k, v, positions, positions, segment_ids, segment_ids, attn_impl,
                            window)
        elif "block_tables" in full_cache:
            out, full_cache = _paged_attention_step(q, k, v, full_cache, index, positions,
                                                    window)
        elif "k_scale" in full_cache:  # int8 dense cache: codes + per-token-per-head scales
            for name, new in (("k", k), ("v", v)):
                codes, scale = quantize_kv(new)
                full_cache = {**full_cache,
                              name: full_cache[name].at[index, batch_index, positions].set(codes),
                              name + "_scale": full_cache[name + "_scale"].at[
                                  index, batch_index, positions].set(scale)}
            ck, cv = (dequantize_kv(full_cache[n][index], full_cache[n + "_scale"][index], dtype)
                      for n in ("k", "v"))
            kv_pos = jnp.broadcast_to(jnp.arange(ck.shape[1]), ck.shape[:2])
            out = attention(q, ck, cv, positions, kv_pos, impl=attn_impl, window=window)
        else:
            full_cache = {
                name: full_cache[name].at[index, batch_index, positions].set(
                    new.astype(full_cache[name].dtype))
                for name, new in (("k", k), ("v", v))}
            ck, cv = full_cache["k"][index], full_cache["v"][index]
            kv_pos = jnp.broadcast_to(jnp.arange(ck.shape[1]), ck.shape[:2])
            out = attention(q, ck.astype(dtype), cv.astype(dtype), positions, kv_pos,
                            impl=attn_impl, window=window)
        x = x + project(out, w["wo"], "bshk,hkd->bsd")
        x = constrain(x, ("batch", "seq", "embed"))
        h = rms_norm(x, w["mlp_norm"], c.norm_eps)
        if c.n_experts:  # routing sums leave the scan as its per-layer outputs
            y, stats = moe_mlp(h, w["moe"], c)
            return (x + y, full_cache, index + 1), stats
        x = x + swiglu(h, w["w_gate"], w["w_up"], w["w_down"])
        return (x, full_cache, index + 1), None

    policy = _remat_policy(remat)
    if remat != "none":
        layer = jax.checkpoint(layer, policy=policy)
    if isinstance(p["layers"], (list, tuple)):  # unstacked (see unstack_layers): unrolled
        carry, per_layer = (x, cache, 0), []
        for w in p["layers"]:
            carry, stats = layer(carry, w)
            per_layer.append(stats)
        x, new_cache, _ = carry
        stats = jax.tree.map(lambda *s: jnp.stack(s), *per_layer) if c.n_experts else None
    else:
        (x, new_cache, _), stats = jax.lax.scan(layer, (x, cache, jnp.int32(0)), p["layers"])
    if output_hidden:
        return (x, new_cache, stats) if moe_stats else (x, new_cache)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
    x = rms_norm(x, p["final_norm"], c.norm_eps)
    if c.tie_embeddings:  # contract with the (V, D) table as stored: a .T here made XLA:CPU
        # copy the transposed table on every call (the whole matrix, each decode step)
        logits = project(x, p["embed"], "...d,vd->...v", preferred_element_type=jnp.float32)
    else:
        logits = project(x, p["unembed"], "...d,dv->...v",
                         preferred_element_type=jnp.float32)
    if logits.ndim == 3:  # vocab-parallel logits under tensor parallelism
        logits = constrain(logits, ("batch", None, "vocab"))
    return (logits, new_cache, stats) if moe_stats else (logits, new_cache)
