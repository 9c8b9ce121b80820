"""Weight quantization (int8 absmax, int8 zero-point, group-wise int4, LLM.int8()) and the
int8 KV cache's per-token-per-head quantizer.

A quantized matrix is a `QuantizedWeight` pytree that replaces the float leaf in the params
tree. Its codes are stored output-major, `(..., N, K)` with K the contraction (input) size
and N the output size, whatever the float leaf's axis order was: then every projection is the
same `...k,nk->...n` contraction, int4 groups and nibble pairs run along the contiguous K
axis, and the embedding table (V, D) is already in that form, so the token lookup is a row
gather. Leading axes (the stacked `layers` axis) are kept as they are, so `lax.scan` and
`unstack_layers` slice quantized leaves like float ones.

Schemes (`SCHEMES`), with s the scale of a row (or group) and q the integer code:
  int8      symmetric, per output channel: s = max|w| / 127, q = round(w / s) in [-127, 127]
  int8-zp   asymmetric, per output channel: s = (max - min) / 255 over the range widened to
            hold 0, zero z = -128 - round(min / s), q = clip(round(w / s) + z); w ~ (q - z) s
  int4      symmetric per group of `group_size` inputs: s = max|w| / 7, q in [-7, 7], two
            codes per byte (q + 8 in the low nibble for even k, the high nibble for odd k)
  llm.int8  int8 codes per output row (vector-wise); at run time activation features with
            |x| > threshold in any token go through a float matmul, the rest through an
            int8 x int8 -> int32 dot with per-token activation scales (Dettmers et al. 2022)
Rounding to the nearest code makes the round-trip error at most s/2 per element.

`project(x, w, equation)` is the matmul the model calls: a plain einsum for float weights,
else a quantized product inside the caller's jit. For per-channel schemes the scale is
applied to the output, (x @ q) * s, instead of to the weight, so no scaled weight copy is
built; whether XLA then reads only the narrow codes depends on the backend fusing the int8
-> float convert into the dot (see docs/perf/quantization.md: XLA:CPU does not).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from hpllm.config import ConfigError

SCHEMES = ("int8", "int8-zp", "int4", "llm.int8")
DEFAULT_GROUP_SIZE = 64
DEFAULT_THRESHOLD = 6.0


class QuantizationError(ConfigError):
    """An impossible quantization request (unknown scheme, bad group size); says why."""


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q", "scale", "zero"],
                   meta_fields=["scheme", "shape", "in_axes", "group_size", "threshold"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    q: jax.Array  # int8 (..., N, K), or uint8 (..., N, Kp / 2) for int4 (Kp: K padded)
    scale: jax.Array  # float32 (..., N, groups); groups = 1 except int4 (Kp / group_size)
    zero: jax.Array | None  # int8-zp: float32 (..., N, 1) integer-valued zero points
    scheme: str
    shape: tuple  # the float leaf's trailing (unstacked) shape, e.g. (D, H, Dh) for wq
    in_axes: tuple  # the axes of `shape` that a matmul contracts, e.g. (0,) for wq
    group_size: int = 0  # int4 only
    threshold: float = 0.0  # llm.int8 only

    @property
    def out_axes(self) -> tuple:
        return tuple(a for a in range(len(self.shape)) if a not in self.in_axes)

    @property
    def k(self) -> int:
        return math.prod(self.shape[a] for a in self.in_axes)

    @property
    def n(self) -> int:
        return math.prod(self.shape[a] for a in self.out_axes)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in jax.tree.leaves(self))


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


# Which leaves are matrices, and which of their trailing axes a matmul contracts.
# The embedding table (V, D) contracts D when it is the tied output projection.
MATRIX_IN_AXES = {
    "wq": (3, (0,)), "wk": (3, (0,)), "wv": (3, (0,)), "wo": (3, (0, 1)),
    "w_gate": (2, (0,)), "w_up": (2, (0,)), "w_down": (2, (0,)),
    "embed": (2, (1,)), "unembed": (2, (0,)),
}


# ---------------------------------------------------------------------------- int4 packing

def pack_int4(q):
    """int codes in [-8, 7], (..., K) with K even -> uint8 (..., K / 2), two per byte."""
    if q.shape[-1] % 2:
        raise QuantizationError(f"pack_int4 needs an even last axis, got {q.shape}")
    u = (q.astype(jnp.int32) + 8).astype(jnp.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed):
    """uint8 (..., K / 2) -> int8 codes (..., K) in [-8, 7]; exact inverse of pack_int4."""
    low = (packed & 0x0F).astype(jnp.int8) - 8
    high = (packed >> 4).astype(jnp.int8) - 8
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


# ------------------------------------------------------------- quantize / dequantize (N, K)

def _to_nk(w, shape, in_axes):
    """(..., *shape) -> (..., N, K): outputs first, contracted inputs last."""
    lead = w.ndim - len(shape)
    out_axes = [a for a in range(len(shape)) if a not in in_axes]
    perm = list(range(lead)) + [lead + a for a in out_axes] + [lead + a for a in in_axes]
    w = jnp.transpose(w, perm)
    n = math.prod(shape[a] for a in out_axes)
    return w.reshape(*w.shape[:lead], n, -1)


def _from_nk(w, shape, in_axes):
    """Inverse of _to_nk."""
    lead = w.shape[:-2]
    out_axes = [a for a in range(len(shape)) if a not in in_axes]
    w = w.reshape(*lead, *[shape[a] for a in out_axes], *[shape[a] for a in in_axes])
    order = out_axes + list(in_axes)
    inverse = [order.index(a) for a in range(len(shape))]
    return jnp.transpose(w, list(range(len(lead))) + [len(lead) + i for i in inverse])


def _safe(scale):
    # An all-zero row has scale 0; any positive scale represents it exactly (codes 0).
    return jnp.where(scale > 0, scale, 1.0)


def quantize_nk(w, scheme: str, group_size: int = DEFAULT_GROUP_SIZE):
    """(q, scale, zero) of a float (..., N, K) matrix (codes along the last axis)."""
    w = w.astype(jnp.float32)
    if scheme in ("int8", "llm.int8"):
        scale = _safe(jnp.max(jnp.abs(w), axis=-1, keepdims=True) / 127.0)
        return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale, None
    if scheme == "int8-zp":
        lo = jnp.minimum(jnp.min(w, axis=-1, keepdims=True), 0.0)
        hi = jnp.maximum(jnp.max(w, axis=-1, keepdims=True), 0.0)
        scale = _safe((hi - lo) / 255.0)
        zero = jnp.clip(-128.0 - jnp.round(lo / scale), -128, 127)
        q = jnp.clip(jnp.round(w / scale) + zero, -128, 127).astype(jnp.int8)
        return q, scale, zero
    if scheme == "int4":
        k = w.shape[-1]
        pad = -k % group_size
        w = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, pad)])
        groups = w.reshape(*w.shape[:-1], -1, group_size)
        scale = _safe(jnp.max(jnp.abs(groups), axis=-1) / 7.0)  # (..., N, Kp / g)
        q = jnp.clip(jnp.round(groups / scale[..., None]), -7, 7).reshape(w.shape)
        return pack_int4(q), scale, None
    raise QuantizationError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")


def dequantize_nk(q, scale, zero, scheme: str, k: int, group_size: int = 0,
                  dtype=jnp.float32):
    """The float (..., N, K) matrix that (q, scale, zero) represent."""
    if scheme == "int4":
        codes = unpack_int4(q).astype(jnp.float32)
        groups = codes.reshape(*codes.shape[:-1], -1, group_size) * scale[..., None]
        return groups.reshape(*codes.shape)[..., :k].astype(dtype)
    codes = q.astype(jnp.float32)
    if zero is not None:
        codes = codes - zero
    return (codes * scale).astype(dtype)


def quantize(w, scheme: str, in_axes, *, group_size: int = DEFAULT_GROUP_SIZE,
             threshold: float = DEFAULT_THRESHOLD, trailing: int | None = None) -> QuantizedWeight:
    """Quantize a float matrix whose trailing `trailing` axes (default: all) are one weight
    and whose `in_axes` (indices into those trailing axes) are contracted by its matmul."""
    check_scheme(scheme, group_size, threshold)
    trailing = w.ndim if trailing is None else trailing
    return _quantize_jit(w, scheme, tuple(in_axes), group_size, float(threshold), trailing)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize_jit(w, scheme, in_axes, group_size, threshold, trailing):
    shape = tuple(w.shape[w.ndim - trailing:])
    q, scale, zero = quantize_nk(_to_nk(w, shape, in_axes), scheme, group_size)
    return QuantizedWeight(q, scale, zero, scheme, shape, in_axes,
                           group_size if scheme == "int4" else 0,
                           threshold if scheme == "llm.int8" else 0.0)


def dequantize(w: QuantizedWeight, dtype=jnp.float32):
    """The float weight, in the layout and shape of the leaf it replaced."""
    nk = dequantize_nk(w.q, w.scale, w.zero, w.scheme, w.k, w.group_size, dtype)
    return _from_nk(nk, w.shape, w.in_axes)


def check_scheme(scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                 threshold: float = DEFAULT_THRESHOLD) -> None:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r} "
                                f"(known: {', '.join(SCHEMES)})")
    if scheme == "int4" and (group_size < 2 or group_size % 2):
        raise QuantizationError(f"int4 group size must be an even number >= 2, got {group_size}")
    if scheme == "llm.int8" and not threshold > 0:
        raise QuantizationError(f"llm.int8 outlier threshold must be positive, got {threshold}")


def quantize_params(params: dict, scheme: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                    threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The params tree with every matrix (MATRIX_IN_AXES; stacked or unstacked layers)
    replaced by a QuantizedWeight; norms, position embeddings, mixture-of-experts weights and
    unknown leaves stay float. Already-quantized leaves are kept."""
    check_scheme(scheme, group_size, threshold)

    def leaf(path, w):
        if is_quantized(w):
            return w
        keys = [getattr(k, "key", None) for k in path]
        if keys[-1] not in MATRIX_IN_AXES or "moe" in keys:  # experts stay float (for now)
            return w
        name = keys[-1]
        trailing, in_axes = MATRIX_IN_AXES[name]
        if w.ndim < trailing:
            return w
        return quantize(w, scheme, in_axes, group_size=group_size, threshold=threshold,
                        trailing=trailing)

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_quantized)


def dequantize_params(params: dict, dtype=jnp.float32) -> dict:
    return jax.tree.map(lambda w: dequantize(w, dtype) if is_quantized(w) else w, params,
                        is_leaf=is_quantized)


def param_bytes(params: dict) -> int:
    """Bytes the parameters occupy (codes, scales and float leaves)."""
    return sum(int(a.nbytes) for a in jax.tree.leaves(params))


# ------------------------------------------------------------------- the model's matmuls

def project(x, w, equation: str, **einsum_kwargs):
    """x @ w for the model's projections: `jnp.einsum(equation, x, w)` for a float weight.

    For a QuantizedWeight the equation must contract the trailing axes of x with the weight's
    in_axes in order (every projection of the model does), and the result has the weight's
    output axes appended to x's leading ones, as the einsum would give.
    """
    if not is_quantized(w):
        return jnp.einsum(equation, x, w, **einsum_kwargs)
    n_in = len(w.in_axes)
    lead = x.shape[:x.ndim - n_in]
    xk = x.reshape(*lead, w.k)
    out_dtype = einsum_kwargs.get("preferred_element_type") or x.dtype
    y = _matmul_nk(xk, w).astype(out_dtype)
    return y.reshape(*lead, *[w.shape[a] for a in w.out_axes])


# Rows of x (tokens) up to which matmuls go to the CPU kernel: decode, batched decode and
# verify steps. bench/quant_matmul.py --sweep measured the kernel ahead of XLA's
# dequantize-then-GEMM up to 256 rows on the loaded dev machine; 40-110 is the idle estimate
# (docs/perf/quantization.md). Prefill chunks above this stay on XLA's GEMM.
CPU_KERNEL_MAX_ROWS = 64
_KERNEL_SCHEMES = ("int8", "int8-zp", "int4")


def _matmul_nk(x, w: QuantizedWeight):
    """x (..., K) float @ the (N, K) quantized matrix -> (..., N).

    On CPU, few rows of x and an int8/int8-zp/int4 weight go to the C++ kernel
    (hpllm/kernels/cpu_quant_matmul.py), which reads the codes once instead of XLA:CPU's
    float32 copy of the matrix; other platforms lower the same jitted code to the XLA path.
    """
    rows = math.prod(x.shape[:-1])
    if w.scheme in _KERNEL_SCHEMES and w.q.ndim == 2 and rows <= CPU_KERNEL_MAX_ROWS:
        from hpllm.kernels import cpu_quant_matmul

        if cpu_quant_matmul.available():
            return jax.lax.platform_dependent(x, w, cpu=_kernel_matmul_nk,
                                              default=_xla_matmul_nk)
    return _xla_matmul_nk(x, w)


def _kernel_matmul_nk(x, w: QuantizedWeight):
    """_matmul_nk through the CPU kernel: float32 inside, x.dtype out."""
    from hpllm.kernels import cpu_quant_matmul as kernel

    x32 = x.astype(jnp.float32)
    if w.scheme == "int4":
        y = kernel.int4_matmul(x32, w.q, w.scale, w.k, w.group_size)
    else:
        y = kernel.int8_matmul(x32, w.q, w.scale)
        if w.scheme == "int8-zp":  # as in _xla_matmul_nk
            y = y - jnp.sum(x32, axis=-1, keepdims=True) * (w.zero * w.scale)[..., 0]
    return y.astype(x.dtype)


def _xla_matmul_nk(x, w: QuantizedWeight):
    """_matmul_nk in plain XLA ops: every platform, and the kernel's reference."""
    compute = x.dtype
    if w.scheme == "int8":  # scale the output, not the weight: no scaled weight copy
        y = jnp.einsum("...k,nk->...n", x, w.q.astype(compute))
        return y * w.scale[..., 0].astype(compute)
    if w.scheme == "int8-zp":  # x @ ((q - z) s) = (x @ q) s - (sum_k x) z s
        y = jnp.einsum("...k,nk->...n", x, w.q.astype(compute))
        zs = (w.zero * w.scale)[..., 0]
        return (y * w.scale[..., 0].astype(compute)
                - jnp.sum(x, axis=-1, keepdims=True) * zs.astype(compute))
    if w.scheme == "int4":
        deq = dequantize_nk(w.q, w.scale, None, "int4", w.k, w.group_size, compute)
        return jnp.einsum("...k,nk->...n", x, deq)
    if w.scheme == "llm.int8":
        return llm_int8_matmul(x, w.q, w.scale[..., 0], w.threshold)
    raise QuantizationError(f"unknown quantization scheme {w.scheme!r}")


def llm_int8_matmul(x, q, w_scale, threshold: float = DEFAULT_THRESHOLD):
    """LLM.int8(): x (..., K) float, weight codes q (N, K) int8 with per-row scales (N,).

    Input features (columns of x) where any token has |x| > threshold are outliers: they are
    multiplied in float against the dequantized weight columns. The other features are
    quantized per token (absmax over the regular features, vector-wise) to int8 and
    multiplied with an int32-accumulating integer dot. Shapes stay static under jit: outliers
    are masked, not gathered.
    """
    compute = x.dtype
    x32 = x.astype(jnp.float32)
    flat = x32.reshape(-1, x32.shape[-1])
    outlier = jnp.any(jnp.abs(flat) > threshold, axis=0)  # (K,)
    regular = jnp.where(outlier, 0.0, x32)
    x_scale = _safe(jnp.max(jnp.abs(regular), axis=-1, keepdims=True) / 127.0)
    xq = jnp.clip(jnp.round(regular / x_scale), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, q, (((xq.ndim - 1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * x_scale * w_scale
    w_outlier = jnp.where(outlier, q.astype(jnp.float32), 0.0) * w_scale[:, None]
    y = y + jnp.einsum("...k,nk->...n", jnp.where(outlier, x32, 0.0), w_outlier)
    return y.astype(compute)


def embed_lookup(table, tokens, dtype=None):
    """table[tokens] for a float (V, D) table or a quantized one (rows are its N axis)."""
    if not is_quantized(table):
        return table[tokens]
    if table.in_axes != (1,) or len(table.shape) != 2:
        raise QuantizationError("embed_lookup needs a (V, D) table quantized along D")
    zero = None if table.zero is None else table.zero[tokens]
    return dequantize_nk(table.q[tokens], table.scale[tokens], zero, table.scheme, table.k,
                         table.group_size, dtype or jnp.float32)


def cast_params(params, dtype):
    """Every float leaf cast to `dtype`; quantized weights stay as they are (their matmuls
    dequantize into the activations' dtype)."""
    return jax.tree.map(lambda w: w if is_quantized(w) else w.astype(dtype), params,
                        is_leaf=is_quantized)


# ------------------------------------------------------------------------- int8 KV cache

def quantize_kv(x):
    """Keys or values (..., head_dim) -> int8 codes (..., head_dim) and float32 scales (...),
    one scale per token per head (absmax over head_dim / 127)."""
    x = x.astype(jnp.float32)
    scale = _safe(jnp.max(jnp.abs(x), axis=-1) / 127.0)
    return jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8), scale


def dequantize_kv(q, scale, dtype=jnp.float32):
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    """Cache bytes one token of one sequence occupies (keys and values, all layers)."""
    per_head = head_dim + 4 if kv_dtype == "int8" else head_dim * jnp.dtype(kv_dtype).itemsize
    return 2 * n_layers * n_kv_heads * per_head


# ------------------------------------------------------------- quantized checkpoints (files)

QUANT_CONFIG_KEY = "hpllm_quantized"  # in config.json: marks a directory saved by save_quantized


def save_quantized(out_dir, config, params: dict, tokenizer, scheme: str, **settings) -> None:
    """A directory that `load_model` reads back with no --quant: model.safetensors (codes,
    scales and float leaves; each quantized leaf's layout in the header), config.json
    (ModelConfig + the scheme) and the tokenizer as tokenizer.json/tokenizer_config.json."""
    import json
    import pathlib

    import numpy as np
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, layouts = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if not is_quantized(leaf):
            tensors[name] = np.asarray(leaf)
            continue
        layouts[name] = {"scheme": leaf.scheme, "shape": list(leaf.shape),
                         "in_axes": list(leaf.in_axes), "group_size": leaf.group_size,
                         "threshold": leaf.threshold}
        for part in ("q", "scale", "zero"):
            if getattr(leaf, part) is not None:
                tensors[f"{name}:{part}"] = np.asarray(getattr(leaf, part))
    save_file(tensors, str(out / "model.safetensors"),
              metadata={"format": "hpllm-quantized", "layouts": json.dumps(layouts)})
    (out / "config.json").write_text(json.dumps(
        {QUANT_CONFIG_KEY: {"scheme": scheme, **settings},
         "model": dataclasses.asdict(config)}, indent=1))
    tokenizer.hf.save(str(out / "tokenizer.json"))
    token = tokenizer.hf.id_to_token
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": token(tokenizer.bos_id) if tokenizer.bos_id is not None else None,
        "eos_token": token(tokenizer.eos_id) if tokenizer.eos_id is not None else None,
        "add_bos_token": tokenizer.add_bos, "chat_template": tokenizer.chat_template},
        indent=1))


def is_quantized_dir(path) -> bool:
    import json
    import pathlib

    cfg = pathlib.Path(path) / "config.json"
    try:
        return QUANT_CONFIG_KEY in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def load_quantized(path):
    """(ModelConfig, params with QuantizedWeight leaves, the scheme settings) of a directory
    written by save_quantized."""
    import json
    import pathlib

    from safetensors import safe_open

    from hpllm.checkpoints import ModelError
    from hpllm.config import ModelConfig

    folder = pathlib.Path(path)
    try:
        meta = json.loads((folder / "config.json").read_text())
        config = ModelConfig(**meta["model"])
        with safe_open(str(folder / "model.safetensors"), "numpy") as f:
            layouts = json.loads(f.metadata()["layouts"])
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # missing file, bad JSON, unknown config key, bad safetensors
        raise ModelError(f"{folder}: not a readable quantized checkpoint ({e})") from None
    params: dict = {}

    def put(name, value):
        *parents, last = name.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    for name, a in arrays.items():
        if ":" not in name:
            put(name, jnp.asarray(a))
    for name, lay in layouts.items():
        part = {p: (jnp.asarray(arrays[f"{name}:{p}"]) if f"{name}:{p}" in arrays else None)
                for p in ("q", "scale", "zero")}
        put(name, QuantizedWeight(part["q"], part["scale"], part["zero"], lay["scheme"],
                                  tuple(lay["shape"]), tuple(lay["in_axes"]),
                                  lay["group_size"], lay["threshold"]))
    return config, params, meta[QUANT_CONFIG_KEY]
