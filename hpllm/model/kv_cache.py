"""The device-side KV caches: what a decoder layer writes its keys/values into and attends
over. Two layouts, each float32, bfloat16 or int8 (the one KV dtype vocabulary,
hpllm.config.KV_DTYPES):

  DenseKVCache  (L, B, T, K, Dh): slot t of row b holds the key/value of position t
                (single-stream generation, early exit, the speculative draft).
  PagedKVCache  a pool of fixed-size blocks, (L, N, bs, K, Dh) or a list of L (N, bs, K, Dh)
                arrays, shared by every sequence; position p of row b lives in block
                block_tables[b, p // bs] at offset p % bs (the engine; hpllm.infer.kv_cache
                decides which blocks a sequence owns). Position -1 marks a padding token,
                which writes into the reserved null block 0 that no visible slot maps to.

int8 stores codes plus a float32 scale per token per head (hpllm.quantized.quantize_kv):
68 instead of 256 bytes per float32 head of 64.

Both are pytrees with the same two methods, all the layer calls:
    cache = cache.update(layer, k, v, positions)   # k, v (B, S, K, Dh) at positions (B, S)
    out = cache.attend(layer, q, positions, impl, window)   # q (B, S, H, Dh), after update
A query at position p sees the slots of positions 0..p (and, with a window w, > p - w).
`layer` is a Python int (unrolled layers: required for a per-layer list) or a traced index
(a scan over stacked layers). Inside jit nothing is checked against data: positions must stay
below the dense length, or inside each row's block table (writes past either are dropped).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from hpllm.config import KV_DTYPES, ConfigError, ModelConfig
from hpllm.kernels.paged_attention import paged_attention
from hpllm.model.attention import attention
from hpllm.quantized import dequantize_kv, quantize_kv


def check_kv_dtype(kv_dtype: str) -> str:
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


def kv_bytes_per_token(config: ModelConfig, kv_dtype: str = "float32") -> int:
    """Cache bytes one token of one sequence occupies (keys and values, all layers)."""
    if check_kv_dtype(kv_dtype) == "int8":  # one byte per element plus a float32 scale per head
        per_head = config.head_dim + 4
    else:
        per_head = config.head_dim * jnp.dtype(kv_dtype).itemsize
    return 2 * config.n_layers * config.n_kv_heads * per_head


def _arrays(config: ModelConfig, shape: tuple, kv_dtype: str, per_layer: bool) -> dict:
    """Zeroed k, v (and int8 scales) of shape (L, *shape, K, Dh), or lists of L arrays."""
    shape = (config.n_layers, *shape, config.n_kv_heads, config.head_dim)
    specs = {"k": (shape, kv_dtype), "v": (shape, kv_dtype)}
    if check_kv_dtype(kv_dtype) == "int8":
        specs.update(k_scale=(shape[:-1], "float32"), v_scale=(shape[:-1], "float32"))
    return {name: [jnp.zeros(s[1:], d) for _ in range(s[0])] if per_layer else jnp.zeros(s, d)
            for name, (s, d) in specs.items()}


def _set(array, layer, where: tuple, value):
    """array[layer][where] = value, for one stacked array or a per-layer list. A list is
    written per layer in place: slicing a layer out of one stacked pool and writing it back
    would copy that layer's whole pool (every block) on every step on XLA:CPU."""
    if isinstance(array, list):
        array = list(array)
        array[layer] = array[layer].at[where].set(value.astype(array[layer].dtype))
        return array
    return array.at[(layer, *where)].set(value.astype(array.dtype))


@dataclasses.dataclass(frozen=True)
class _Cache:
    """Keys and values (or int8 codes with their float32 scales, else None), per layer."""
    k: jax.Array | list
    v: jax.Array | list
    k_scale: jax.Array | list | None = None
    v_scale: jax.Array | list | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def n_layers(self) -> int:
        return len(self.k) if isinstance(self.k, list) else self.k.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(self))

    def _store(self, layer, where: tuple, k, v):
        new = {"k": k, "v": v}
        if self.quantized:
            new["k"], new["k_scale"] = quantize_kv(k)
            new["v"], new["v_scale"] = quantize_kv(v)
        return dataclasses.replace(self, **{name: _set(getattr(self, name), layer, where, value)
                                            for name, value in new.items()})

    def _read(self, name: str, layer, dtype, index=None):
        """Layer `layer` of k or v (optionally gathered at `index`) in `dtype`."""
        values = getattr(self, name)[layer]
        values = values if index is None else values[index]
        if not self.quantized:
            return values.astype(dtype)
        scale = getattr(self, name + "_scale")[layer]
        return dequantize_kv(values, scale if index is None else scale[index], dtype)

    def map_layered(self, fn):
        """This cache with fn(name, array) in place of each of k, v (and the int8 scales)."""
        return dataclasses.replace(self, **{name: fn(name, getattr(self, name))
                                            for name in ("k", "v", "k_scale", "v_scale")
                                            if getattr(self, name) is not None})

    def slice_layers(self, start: int, stop: int):
        """The cache of layers start..stop-1 (e.g. the self-draft's first layers)."""
        return self.map_layered(lambda name, a: a[start:stop])

    def merge_layers(self, start: int, part):
        """This cache with layers start.. replaced by those of `part` (see slice_layers)."""
        def merge(name, a):
            b = getattr(part, name)
            if isinstance(a, list):
                return a[:start] + list(b) + a[start + len(b):]
            return a.at[start:start + b.shape[0]].set(b)
        return self.map_layered(merge)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVCache(_Cache):
    """k, v: (L, B, T, K, Dh) float or int8 codes; k_scale, v_scale (L, B, T, K) for int8."""

    @classmethod
    def create(cls, config: ModelConfig, batch: int, length: int, kv_dtype: str = "float32"):
        return cls(**_arrays(config, (batch, length), kv_dtype, per_layer=False))

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def update(self, layer, k, v, positions) -> DenseKVCache:
        rows = jnp.arange(positions.shape[0])[:, None]
        return self._store(layer, (rows, positions), k, v)

    def attend(self, layer, q, positions, impl: str = "reference", window=None):
        k, v = self._read("k", layer, q.dtype), self._read("v", layer, q.dtype)
        kv_pos = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])
        return attention(q, k, v, positions, kv_pos, impl=impl, window=window)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache(_Cache):
    """k, v: (L, N, bs, K, Dh) or a list of L (N, bs, K, Dh) arrays (unrolled layers);
    k_scale, v_scale likewise without Dh for int8; block_tables (B, M) int32, set per pass
    (`with_tables`), None between passes."""
    block_tables: jax.Array | None = None

    @classmethod
    def create(cls, config: ModelConfig, num_blocks: int, block_size: int,
               kv_dtype: str = "float32", unrolled: bool = True):
        """A zeroed pool of num_blocks blocks (block 0 is the null block). unrolled: one array
        per layer, so a step writes and reads a layer's blocks in place (see `_set`)."""
        return cls(**_arrays(config, (num_blocks, block_size), kv_dtype, per_layer=unrolled))

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1] if isinstance(self.k, list) else self.k.shape[2]

    def with_tables(self, block_tables) -> PagedKVCache:
        return dataclasses.replace(self, block_tables=block_tables)

    def update(self, layer, k, v, positions) -> PagedKVCache:
        valid = positions >= 0
        safe = jnp.where(valid, positions, 0)
        blocks = jnp.take_along_axis(self.block_tables, safe // self.block_size, axis=1)
        blocks = jnp.where(valid, blocks, 0)
        offsets = jnp.where(valid, safe % self.block_size, 0)
        return self._store(layer, (blocks, offsets), k, v)

    def attend(self, layer, q, positions, impl: str = "auto", window=None):
        """Through the block tables (hpllm.kernels.paged_attention; `impl` is the model's
        dense-attention choice and does not apply here)."""
        del impl
        tables = self.block_tables
        if not self.quantized:
            return paged_attention(q, self.k[layer], self.v[layer], tables, positions,
                                   window=window)
        # Dequantize only the blocks these rows use (never the whole pool), then attend
        # through an identity table over the gathered copy.
        b, m = tables.shape
        k, v = (self._read(name, layer, q.dtype, tables).reshape(b * m, *self.k[layer].shape[1:])
                for name in ("k", "v"))
        identity = jnp.arange(b * m, dtype=tables.dtype).reshape(b, m)
        return paged_attention(q, k, v, identity, positions, window=window)


@functools.partial(jax.jit, donate_argnames=("cache",))
def copy_blocks(cache: PagedKVCache, src, dst) -> PagedKVCache:
    """Block src[i] copied onto block dst[i] in every layer (copy-on-write of shared blocks)."""
    def copy(name, a):
        if isinstance(a, list):
            return [x.at[dst].set(x[src]) for x in a]
        return a.at[:, dst].set(a[:, src])
    return cache.map_layered(copy)
