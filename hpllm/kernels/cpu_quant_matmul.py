"""CPU kernels for matmuls with quantized weights (int8 per row, int4 per group), through
JAX's FFI, beside their XLA references.

XLA:CPU converts a whole int8 matrix into a fresh float32 buffer before the dot, so decode
with quantized weights ran ~8-12x slower than float32 (docs/perf/quantization.md). The C++
kernels in csrc/quant_matmul.cc read each weight row once, convert it in registers (AVX2 +
FMA when the compiler targets them) and multiply it against all M rows of x, over XLA's
intra-op thread pool: the weight bytes a decode step reads really shrink.

The source is compiled on first use with g++ (-O3 -march=native) into
$HPLLM_CACHE/kernels/quant_matmul-<hash>.so (hash of source, flags, compiler, jax version and
CPU), loaded with ctypes and registered as FFI targets for the CPU platform. `available()`
says whether that worked (no g++, a failed build: a warning says why, once);
HPLLM_CPU_KERNELS=0 turns the kernels off.

    int8_matmul(x, q, scale)                       x (..., K) @ (q * scale[:, None]).T
    int4_matmul(x, packed, scale, k, group_size)   x (..., K) @ dequantized int4 (N, K).T

x may be any float dtype: the kernels compute in float32 and return x.dtype. Gradients flow
to x (dy @ W) and to the scales, through the XLA references; the integer codes get none.
The int4 byte layout (`pack_int4`, `unpack_int4`) is defined here, beside the kernel that
reads it; hpllm/quantized.py packs weights with it. Of hpllm this module imports only
`hpllm.cache` (where the build is kept).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.cache import cache_dir

SOURCE = pathlib.Path(__file__).parent / "csrc" / "quant_matmul.cc"
COMMON_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17")
NATIVE_FLAGS = ("-march=native", *COMMON_FLAGS)
# Targets x86-64 without AVX2: the scalar fallback, built only by the tests.
PORTABLE_FLAGS = ("-march=x86-64", "-mtune=generic", *COMMON_FLAGS)
ENV_SWITCH = "HPLLM_CPU_KERNELS"


class KernelError(RuntimeError):
    """The CPU kernels cannot be built or loaded, or were called with bad shapes; says why."""


# ------------------------------------------------------------------------------ building

def _compiler() -> str:
    path = shutil.which("g++")
    if path is None:
        raise KernelError("g++ not found on PATH")
    return path


def _cpu_id() -> str:
    """What -march=native depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def build(flags: tuple = NATIVE_FLAGS, source_path: pathlib.Path = SOURCE) -> pathlib.Path:
    """The compiled library of `source_path` (default: these kernels) for `flags`, built once
    per source, flags, compiler, jax version and CPU. Written under a temporary name and
    renamed into place, so a concurrent process never loads a half-written file."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    source = source_path.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                     jax.__version__.encode(), _cpu_id().encode()]))
    out = cache_dir() / "kernels" / f"{source_path.stem}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem, suffix=".tmp")
    os.close(fd)
    # -isystem: the FFI headers are not ours to keep warning-free
    cmd = [compiler, *flags, "-isystem", jax.ffi.include_dir(), str(source_path), "-o", tmp]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            errors = [ln for ln in result.stderr.splitlines() if "error" in ln]
            raise KernelError(f"{' '.join(cmd)} failed: "
                              f"{(errors or result.stderr.splitlines() or ['?'])[0]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


_TARGETS = {"int8": "HpllmInt8Matmul", "int4": "HpllmInt4Matmul"}


@functools.cache
def _load(variant: str) -> str:
    """Builds, loads and registers the kernels of `variant` ("native" or "portable"); the FFI
    target-name suffix. Raises KernelError."""
    flags = NATIVE_FLAGS if variant == "native" else PORTABLE_FLAGS
    library = ctypes.cdll.LoadLibrary(str(build(flags)))
    suffix = "" if variant == "native" else f"_{variant}"
    for kind, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(f"hpllm_{kind}_matmul{suffix}",
                                    jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    _LIBRARIES.append(library)  # never unloaded: XLA holds the handler pointers
    return suffix


_LIBRARIES: list = []


@functools.cache
def _native_status() -> str | None:
    """None when the native kernels are registered, else why not (warned once)."""
    try:
        _load("native")
        return None
    except (OSError, RuntimeError, AttributeError) as e:  # KernelError, XLA's errors
        reason = str(e)
    warnings.warn(f"hpllm: CPU quantized-matmul kernels unavailable ({reason}); quantized "
                  "matmuls use the XLA path", RuntimeWarning, stacklevel=3)
    return reason


def enabled() -> bool:
    """False when HPLLM_CPU_KERNELS=0."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the CPU kernels can be used: enabled, compiled and registered (built on the
    first call)."""
    return enabled() and _native_status() is None


def _suffix(variant: str) -> str:
    if variant == "native":
        reason = _native_status() if enabled() else f"disabled by {ENV_SWITCH}=0"
        if reason is not None:
            raise KernelError(f"CPU quantized-matmul kernels unavailable: {reason}")
    return _load(variant)


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

def _ffi(kind: str, suffix: str, x, weight, scale, **attrs):
    out = jax.ShapeDtypeStruct((*x.shape[:-1], weight.shape[-2]), jnp.float32)
    # expand_dims: vmapped calls get size-1 batch axes on unbatched operands; the kernel
    # broadcasts them, so a weight shared by the batch is still read once.
    call = jax.ffi.ffi_call(f"hpllm_{kind}_matmul{suffix}", out, vmap_method="expand_dims")
    return call(x, weight, scale, **attrs)


def _no_cotangent(a):
    return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _int8(suffix, x, q, scale):
    return _ffi("int8", suffix, x, q, scale)


def _int8_fwd(suffix, x, q, scale):
    return _int8(suffix, x, q, scale), (x, q, scale)


def _int8_bwd(suffix, residuals, dy):
    x, q, scale = residuals
    _, vjp = jax.vjp(lambda x, s: int8_matmul_reference(x, q, s), x, scale)
    dx, dscale = vjp(dy)
    return dx, _no_cotangent(q), dscale


_int8.defvjp(_int8_fwd, _int8_bwd)


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


def int8_matmul(x, q, scale, *, variant: str = "native"):
    """x (..., K) @ W^T with W = q (N, K) int8 * scale (N,) (or (N, 1)) per row: (..., N) in
    x.dtype, computed in float32 by the CPU kernel."""
    if q.dtype != jnp.int8 or q.ndim != 2:
        raise KernelError(f"int8_matmul: q must be int8 (N, K), got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    if scale.size != n:
        raise KernelError(f"int8_matmul: scale {tuple(scale.shape)} must hold one value per "
                          f"row of q {tuple(q.shape)}")
    _check_x(x, k, "int8_matmul")
    suffix = _suffix(variant)
    lead = x.shape[:-1]
    y = _int8(suffix, x.reshape(-1, k).astype(jnp.float32), q,
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
