"""CPU matmuls with float32 or quantized weights (int8 per row, int4 per group) through JAX's
FFI, on gemm.h, beside their XLA references.

XLA:CPU converts a whole int8 matrix into a fresh float32 buffer before the dot, so decode
with quantized weights ran ~8-12x slower than float32 (docs/perf/quantization.md). The C++
kernels (csrc/quant_matmul.cc over the header-only core csrc/gemm.h, docs/perf/cpu_gemm.md)
read each weight row once, convert it in registers (AVX-512, AVX2 or scalar, whatever the
compiler targets) and multiply it against a register tile of x's rows; for many rows
(prefill) they convert panels of weight rows once. Rows of W are split over XLA's intra-op
thread pool, at any M.

Built on first use by hpllm.kernels.native (g++ -O3 -march=native into the kernel cache,
hashed over the sources and gemm.h), loaded with ctypes and registered as FFI targets for
the CPU platform. `available()` says whether that worked (no g++, a failed build: a warning
says why, once); HPLLM_CPU_KERNELS=0 turns the kernels off.

    int8_matmul(x, q, scale)                       x (..., K) @ (q * scale[:, None]).T
    int4_matmul(x, packed, scale, k, group_size)   x (..., K) @ dequantized int4 (N, K).T
    f32_matmul(x, w)                               x (..., K) @ w.T, w float32 (N, K)
    matmul_block(...)                              gemm.h on NumPy arrays (ctypes; tests)

Where VNNI is compiled in (and in the portable build, same integer arithmetic), gemm.h
multiplies quantized weights by quantized x: int4 up to 47 rows (decode, batches) by x at 8
bits per 8 k, int8 from 6 rows by x at 15 bits per row (int8_x16_min_rows and
int4_x8_max_rows say where); SmolLM2-135M perplexity: int8 +0.089 % vs float32, int4 -0.16 % vs its float path.

int8_matmul(prepared=True), or HPLLM_INT8_VNNI=1: x is quantized to int8 per block of 64 k
and multiplied int8 x int8 (VNNI): faster for several rows, but x's rounding costs
perplexity (+0.35 % on SmolLM2-135M, above the +0.1 % gate), so it is off by default.

x may be any float dtype: the kernels compute in float32 and return x.dtype. Gradients flow
to x (dy @ W) and to the scales, through the XLA references; the integer codes get none.
The int4 byte layout (`pack_int4`, `unpack_int4`) is defined here, beside the kernel that
reads it; hpllm/quantized.py packs weights with it. Of hpllm this module imports only
`hpllm.kernels.native` (the build).
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.kernels import native

SOURCE = native.CSRC / "quant_matmul.cc"
HEADERS = (native.CSRC / "gemm.h", native.CSRC / "parallel_chunks.h")
ENV_SWITCH = native.ENV_SWITCH
# Quantize x per block and multiply int8 x int8 (VNNI) in int8_matmul; see prepared_supported.
VNNI_SWITCH = "HPLLM_INT8_VNNI"
_SYMBOLS = {"f32": "HpllmF32Matmul", "int8": "HpllmInt8Matmul", "int4": "HpllmInt4Matmul",
            "int8_vnni": "HpllmInt8MatmulVnni"}


class KernelError(RuntimeError):
    """The CPU kernels cannot be built or loaded, or were called with bad shapes; says why."""


def _targets(variant: str) -> dict[str, str]:
    suffix = "" if variant == "native" else f"_{variant}"
    return {f"hpllm_{kind}_matmul{suffix}": symbol for kind, symbol in _SYMBOLS.items()}


def library_path(variant: str = "native") -> pathlib.Path:
    """The compiled kernels of `variant` ("native": -march=native, "portable": x86-64, the
    scalar fallbacks), built on first use. Raises native.NativeBuildError."""
    return native.build("quant_matmul", [SOURCE], HEADERS, portable=variant == "portable")


@functools.cache
def library(variant: str = "native") -> ctypes.CDLL:
    """The loaded library of `variant`, for its plain C entries (HpllmMatmulBlock & co.)."""
    return ctypes.cdll.LoadLibrary(str(library_path(variant)))


def enabled() -> bool:
    """False when HPLLM_CPU_KERNELS=0."""
    return native.enabled()


def _status(variant: str) -> str | None:
    """None when the kernels of `variant` are registered, else why not (warned once)."""
    return native.load_status("quant_matmul", [SOURCE], HEADERS, _targets(variant),
                              portable=variant == "portable")


def available() -> bool:
    """Whether the CPU kernels can be used: enabled, compiled and registered (built on the
    first call)."""
    return _status("native") is None


def _suffix(variant: str) -> str:
    if variant not in ("native", "portable"):
        raise KernelError(f"unknown kernel variant {variant!r}: 'native' or 'portable'")
    reason = _status(variant)
    if reason is not None:
        raise KernelError(f"CPU quantized-matmul kernels unavailable: {reason}")
    return "" if variant == "native" else f"_{variant}"


@functools.cache
def prepared_supported(variant: str = "native") -> bool:
    """Whether the library of `variant` has the int8 x int8 (VNNI) path compiled in."""
    return bool(library(variant).HpllmHasVnni())


def int8_x16_min_rows(variant: str = "native") -> int:
    """From how many rows of x gemm.h multiplies int8 weights by x quantized per row at 15
    bits (int16 codes, vpdpwssd) in the library of `variant`; 0: never (float path only)."""
    lib = library(variant)
    lib.HpllmInt8X16MinRows.restype = ctypes.c_int64
    return int(lib.HpllmInt8X16MinRows())


def int4_x8_max_rows(group_size: int, variant: str = "native") -> int:
    """Up to how many rows of x gemm.h multiplies int4 weights (groups of `group_size`) by x
    quantized to int8 per 8 k (vpdpbusd) in the library of `variant`; 0: never."""
    lib = library(variant)
    lib.HpllmInt4X8MaxRows.restype = ctypes.c_int64
    return int(lib.HpllmInt4X8MaxRows(ctypes.c_int64(group_size)))


def vnni_enabled() -> bool:
    """HPLLM_INT8_VNNI=1: int8_matmul quantizes x per block and multiplies int8 x int8."""
    return os.environ.get(VNNI_SWITCH, "0").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- int4 layout
# Two codes per byte, q + 8 in the low nibble for even k and the high nibble for odd k, along
# the contiguous K axis; each group of `group_size` consecutive k shares one float32 scale,
# and K is padded with zero codes to whole groups (Kp).

def pack_int4(q):
    """int codes in [-8, 7], (..., K) with K even -> uint8 (..., K / 2), two per byte."""
    if q.shape[-1] % 2:
        raise KernelError(f"pack_int4 needs an even last axis, got {q.shape}")
    u = (q.astype(jnp.int32) + 8).astype(jnp.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed):
    """uint8 (..., K / 2) -> int8 codes (..., K) in [-8, 7]; exact inverse of pack_int4."""
    low = (packed & 0x0F).astype(jnp.int8) - 8
    high = (packed >> 4).astype(jnp.int8) - 8
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantize_int4(packed, scale, k: int, group_size: int, dtype=jnp.float32):
    """The float (..., N, k) matrix of `packed` (..., N, Kp / 2) with per-group `scale`
    (..., N, Kp / group_size); the padding columns beyond k are dropped."""
    codes = unpack_int4(packed).astype(jnp.float32)
    groups = codes.reshape(*codes.shape[:-1], -1, group_size) * scale[..., None]
    return groups.reshape(*codes.shape)[..., :k].astype(dtype)


# ---------------------------------------------------------------------------- references

def int8_matmul_reference(x, q, scale):
    """x (M, K) f32 @ (q (N, K) int8 * scale (N,))^T in XLA: the kernel's twin."""
    y = jnp.einsum("mk,nk->mn", x, q.astype(jnp.float32), precision="highest")
    return y * scale


def int4_matmul_reference(x, packed, scale, group_size: int):
    """x (M, K) f32 @ the int4 matrix (packed (N, Kp / 2), scale (N, Kp / group_size))^T,
    dequantized in XLA; padding columns beyond K are dropped."""
    w = dequantize_int4(packed, scale, x.shape[-1], group_size)
    return jnp.einsum("mk,nk->mn", x, w, precision="highest")


# ------------------------------------------------------------------------- the FFI calls

def _ffi(kind: str, suffix: str, x, weight, *rest, **attrs):
    out = jax.ShapeDtypeStruct((*x.shape[:-1], weight.shape[-2]), jnp.float32)
    # expand_dims: vmapped calls get size-1 batch axes on unbatched operands; the kernel
    # broadcasts them, so a weight shared by the batch is still read once.
    call = jax.ffi.ffi_call(f"hpllm_{kind}_matmul{suffix}", out, vmap_method="expand_dims")
    return call(x, weight, *rest, **attrs)


def _no_cotangent(a):
    return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _int8(kind, suffix, x, q, scale):
    return _ffi(kind, suffix, x, q, scale)


def _int8_fwd(kind, suffix, x, q, scale):
    return _int8(kind, suffix, x, q, scale), (x, q, scale)


def _int8_bwd(kind, suffix, residuals, dy):
    x, q, scale = residuals
    _, vjp = jax.vjp(lambda x, s: int8_matmul_reference(x, q, s), x, scale)
    dx, dscale = vjp(dy)
    return dx, _no_cotangent(q), dscale


_int8.defvjp(_int8_fwd, _int8_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _f32(suffix, x, w):
    return _ffi("f32", suffix, x, w)


def _f32_fwd(suffix, x, w):
    return _f32(suffix, x, w), (x, w)


def _f32_bwd(suffix, residuals, dy):
    x, w = residuals
    return dy @ w, dy.T @ x


_f32.defvjp(_f32_fwd, _f32_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _int4(suffix, group_size, x, packed, scale):
    return _ffi("int4", suffix, x, packed, scale, group_size=np.int64(group_size))


def _int4_fwd(suffix, group_size, x, packed, scale):
    return _int4(suffix, group_size, x, packed, scale), (x, packed, scale)


def _int4_bwd(suffix, group_size, residuals, dy):
    x, packed, scale = residuals
    _, vjp = jax.vjp(lambda x, s: int4_matmul_reference(x, packed, s, group_size), x, scale)
    dx, dscale = vjp(dy)
    return dx, _no_cotangent(packed), dscale


_int4.defvjp(_int4_fwd, _int4_bwd)


# ------------------------------------------------------------------------------- the API

def _check_x(x, k: int, what: str):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise KernelError(f"{what}: x must be floating point, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise KernelError(f"{what}: x {tuple(x.shape)} must end in the weight's K = {k}")


def int8_matmul(x, q, scale, *, variant: str = "native", prepared: bool | None = None):
    """x (..., K) @ W^T with W = q (N, K) int8 * scale (N,) (or (N, 1)) per row: (..., N) in
    x.dtype, computed in float32 by the CPU kernel.

    prepared=True: x quantized to int8 per block of 64 (gemm.h prepare_x) and int8 x int8
    products (VNNI) - faster, with x's rounding added; None: as HPLLM_INT8_VNNI says, where
    the library has VNNI."""
    if q.dtype != jnp.int8 or q.ndim != 2:
        raise KernelError(f"int8_matmul: q must be int8 (N, K), got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    if scale.size != n:
        raise KernelError(f"int8_matmul: scale {tuple(scale.shape)} must hold one value per "
                          f"row of q {tuple(q.shape)}")
    _check_x(x, k, "int8_matmul")
    suffix = _suffix(variant)
    lead = x.shape[:-1]
    if prepared is None:
        prepared = vnni_enabled() and prepared_supported(variant)
    y = _int8("int8_vnni" if prepared else "int8", suffix, x.reshape(-1, k).astype(jnp.float32), q,
              scale.reshape(n).astype(jnp.float32))
    return y.reshape(*lead, n).astype(x.dtype)


def int4_matmul(x, packed, scale, k: int, group_size: int, *, variant: str = "native"):
    """x (..., k) @ W^T with W the int4 (N, k) matrix of `packed` (N, Kp / 2) uint8 (as
    `pack_int4` packs codes + 8) and `scale` (N, Kp / group_size),
    Kp = k padded to whole groups: (..., N) in x.dtype, computed in float32."""
    if packed.dtype != jnp.uint8 or packed.ndim != 2:
        raise KernelError(f"int4_matmul: packed must be uint8 (N, Kp / 2), got "
                          f"{packed.dtype} {tuple(packed.shape)}")
    n, half = packed.shape
    if group_size < 2 or group_size % 2:
        raise KernelError(f"int4_matmul: group size must be even and >= 2, got {group_size}")
    if scale.shape != (n, 2 * half // group_size) or 2 * half % group_size:
        raise KernelError(f"int4_matmul: scale {tuple(scale.shape)} does not fit packed "
                          f"{tuple(packed.shape)} in groups of {group_size}")
    if not 2 * half - group_size < k <= 2 * half:
        raise KernelError(f"int4_matmul: k = {k} does not fit packed {tuple(packed.shape)} "
                          f"(k padded to groups of {group_size} must be {2 * half})")
    _check_x(x, k, "int4_matmul")
    suffix = _suffix(variant)
    lead = x.shape[:-1]
    y = _int4(suffix, int(group_size), x.reshape(-1, k).astype(jnp.float32), packed,
              scale.astype(jnp.float32))
    return y.reshape(*lead, n).astype(x.dtype)


def f32_matmul(x, w, *, variant: str = "native"):
    """x (..., K) @ w.T for a float32 w (N, K) (output-major, as the tied LM head): (..., N) in
    x.dtype, computed in float32 by gemm.h."""
    if w.dtype != jnp.float32 or w.ndim != 2:
        raise KernelError(f"f32_matmul: w must be float32 (N, K), got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    _check_x(x, k, "f32_matmul")
    suffix = _suffix(variant)
    lead = x.shape[:-1]
    y = _f32(suffix, x.reshape(-1, k).astype(jnp.float32), w)
    return y.reshape(*lead, n).astype(x.dtype)


# ------------------------------------------------------------ gemm.h through ctypes (tests)

FORMATS = {"f32": 0, "int8": 1, "int4": 2}


def matmul_block(fmt: str, x, w, scale, k: int, group_size: int, n0: int, n1: int, y,
                 accumulate: bool, *, variant: str = "native", prepared: bool = False):
    """gemm.h's matmul_block (prepared: prepare_x + matmul_block_prepared, int8 only) on NumPy
    arrays, in place on y: y[:, n0:n1] (+)= x[:, :k] @ W[n0:n1].T. x and y may be row-strided
    views of wider C-contiguous arrays (ldx, ldy = their row strides)."""
    for a, dtype in ((x, np.float32), (y, np.float32)):
        if a.dtype != dtype or a.ndim != 2 or a.strides[1] != 4:
            raise KernelError("matmul_block: x and y must be float32 2-D with unit column stride")
    if not 0 <= n0 <= n1 <= w.shape[0] or x.shape[1] < k or y.shape[1] < n1:
        raise KernelError(f"matmul_block: rows [{n0}, {n1}) or k = {k} do not fit")
    lib = library(variant)
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    w = np.ascontiguousarray(w)
    sp = None if scale is None else np.ascontiguousarray(scale, np.float32)
    common = (x.ctypes.data, i64(x.shape[0]), i64(x.strides[0] // 4))
    tail = (i64(n0), i64(n1), vp(y.ctypes.data), i64(y.strides[0] // 4), ctypes.c_int(accumulate))
    if prepared:
        if fmt != "int8":
            raise KernelError("matmul_block: the prepared (int8 x int8) path takes int8 weights")
        lib.HpllmMatmulBlockPrepared(vp(common[0]), *common[1:], vp(w.ctypes.data),
                                     vp(sp.ctypes.data), i64(w.shape[0]), i64(k), *tail)
    else:
        lib.HpllmMatmulBlock(ctypes.c_int(FORMATS[fmt]), vp(common[0]), *common[1:],
                             vp(w.ctypes.data), vp(None if sp is None else sp.ctypes.data),
                             i64(w.shape[0]), i64(k), i64(group_size), *tail)
