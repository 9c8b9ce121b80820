"""The quantized-weight type and the matmuls the model runs with it: int8 absmax, int8
zero-point, group-wise int4, LLM.int8(), and the int8 KV cache's per-token-per-head codes.

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
            codes per byte (the layout of hpllm/kernels/cpu_quant_matmul.py: q + 8 in the
            low nibble for even k, the high nibble for odd k)
  llm.int8  int8 codes per output row (vector-wise); at run time activation features with
            |x| > threshold in any token go through a float matmul, the rest through an
            int8 x int8 -> int32 dot with per-token activation scales (Dettmers et al. 2022)
Rounding to the nearest code makes the round-trip error at most s/2 per element.

`project(x, w, equation)` is the matmul the model calls: a plain einsum for float weights,
else a quantized product inside the caller's jit. For per-channel schemes the scale is
applied to the output, (x @ q) * s, instead of to the weight, so no scaled weight copy is
built; whether XLA then reads only the narrow codes depends on the backend fusing the int8
-> float convert into the dot (see docs/perf/quantization.md: XLA:CPU does not, hence the
CPU kernel). Quantizing a whole params tree is hpllm/compress/quantize.py; quantized
checkpoints on disk are hpllm/checkpoints/quantized_checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from hpllm.config import ConfigError
from hpllm.kernels import cpu_matmul, cpu_quant_matmul
from hpllm.kernels.cpu_quant_matmul import dequantize_int4, pack_int4

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


def check_scheme(scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                 threshold: float = DEFAULT_THRESHOLD) -> None:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r} "
                                f"(known: {', '.join(SCHEMES)})")
    if scheme == "int4" and (group_size < 2 or group_size % 2):
        raise QuantizationError(f"int4 group size must be an even number >= 2, got {group_size}")
    if scheme == "llm.int8" and not threshold > 0:
        raise QuantizationError(f"llm.int8 outlier threshold must be positive, got {threshold}")


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
        return dequantize_int4(q, scale, k, group_size, dtype)
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


# ------------------------------------------------------------------- the model's matmuls

def project(x, w, equation: str, **einsum_kwargs):
    """x @ w for the model's projections: `jnp.einsum(equation, x, w)` for a float weight.

    For a QuantizedWeight the equation must contract the trailing axes of x with the weight's
    in_axes in order (every projection of the model does), and the result has the weight's
    output axes appended to x's leading ones, as the einsum would give.
    """
    if not is_quantized(w):
        # large bf16 projections of a CPU training step: the AVX512-BF16 kernel, where the
        # step turned routing on (hpllm/kernels/cpu_matmul.py)
        y = (cpu_matmul.bf16_project(x, w, equation, **einsum_kwargs)
             if set(einsum_kwargs) <= {"preferred_element_type"} else None)
        return y if y is not None else jnp.einsum(equation, x, w, **einsum_kwargs)
    n_in = len(w.in_axes)
    lead = x.shape[:x.ndim - n_in]
    xk = x.reshape(*lead, w.k)
    out_dtype = einsum_kwargs.get("preferred_element_type") or x.dtype
    y = _matmul_nk(xk, w).astype(out_dtype)
    return y.reshape(*lead, *[w.shape[a] for a in w.out_axes])


# Rows of x (tokens) up to which matmuls go to the CPU kernel. Since gemm.h tiles M in
# registers and converts panels once for many rows, the kernel is ahead of XLA's
# dequantize-then-GEMM at every width measured, 1-512 rows (docs/perf/cpu_gemm.md): no limit.
CPU_KERNEL_MAX_ROWS = 1 << 62
_KERNEL_SCHEMES = ("int8", "int8-zp", "int4")


def _matmul_nk(x, w: QuantizedWeight):
    """x (..., K) float @ the (N, K) quantized matrix -> (..., N).

    On CPU, few rows of x and an int8/int8-zp/int4 weight go to the C++ kernel
    (hpllm/kernels/cpu_quant_matmul.py), which reads the codes once instead of XLA:CPU's
    float32 copy of the matrix; other platforms lower the same jitted code to the XLA path.
    """
    rows = math.prod(x.shape[:-1])
    if (w.scheme in _KERNEL_SCHEMES and w.q.ndim == 2 and rows <= CPU_KERNEL_MAX_ROWS
            and cpu_quant_matmul.available()):
        return jax.lax.platform_dependent(x, w, cpu=_kernel_matmul_nk, default=_xla_matmul_nk)
    return _xla_matmul_nk(x, w)


def _kernel_matmul_nk(x, w: QuantizedWeight):
    """_matmul_nk through the CPU kernel: float32 inside, x.dtype out."""
    x32 = x.astype(jnp.float32)
    if w.scheme == "int4":
        y = cpu_quant_matmul.int4_matmul(x32, w.q, w.scale, w.k, w.group_size)
    else:
        y = cpu_quant_matmul.int8_matmul(x32, w.q, w.scale)
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
