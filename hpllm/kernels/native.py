"""Builds, loads and registers hpllm's C++ FFI kernels (kernels/csrc), for every module that
has one.

A kernel's sources are compiled on first use with g++ (-O3 -march=native, or a portable
x86-64 flavour the tests build to check the scalar fallbacks) into
$HPLLM_CACHE/kernels/<name>-<hash>.so, the hash covering the sources, the headers they
include, the flags, the compiler version, the jax version and the CPU's feature flags. The
file is written under a temporary name and renamed into place, so a concurrent process
never loads a half-written library. `load_ffi` loads it with ctypes and registers each FFI
target for the CPU platform, once per process; when that is impossible (no g++, a failed
build, HPLLM_CPU_KERNELS=0) it returns False and warns once saying why.

Of hpllm this module imports only `hpllm.cache` (where the builds are kept).
"""

from __future__ import annotations

import contextlib
import contextvars
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
from collections.abc import Mapping, Sequence

import jax

from hpllm.cache import cache_dir

CSRC = pathlib.Path(__file__).parent / "csrc"
COMMON_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17")
NATIVE_FLAGS = ("-march=native", *COMMON_FLAGS)
# x86-64 without AVX2: the scalar fallbacks, built only by the tests.
PORTABLE_FLAGS = ("-march=x86-64", "-mtune=generic", *COMMON_FLAGS)
ENV_SWITCH = "HPLLM_CPU_KERNELS"


class NativeBuildError(RuntimeError):
    """A native kernel cannot be built or loaded; says why."""


def enabled() -> bool:
    """False when HPLLM_CPU_KERNELS=0 (or false/no/off): every native kernel is off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


class Routing:
    """A switch a caller turns on while it traces a function (the CPU training step does),
    under which a kernel family replaces XLA's ops for what it covers: on only on the CPU
    backend and where `available()` (the family's kernels built and registered)."""

    def __init__(self, name: str, available):
        self._on = contextvars.ContextVar(name, default=False)
        self._available = available

    @contextlib.contextmanager
    def __call__(self, enabled: bool = True):
        token = self._on.set(bool(enabled) and jax.default_backend() == "cpu"
                             and self._available())
        try:
            yield
        finally:
            self._on.reset(token)

    def on(self) -> bool:
        return self._on.get()


def _compiler() -> str:
    path = shutil.which("g++")
    if path is None:
        raise NativeBuildError("g++ not found on PATH")
    return path


@functools.cache
def _compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout


@functools.cache
def cpu_id() -> str:
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


def build(name: str, sources: Sequence[pathlib.Path], headers: Sequence[pathlib.Path] = (),
          portable: bool = False) -> pathlib.Path:
    """The shared library of `sources` (compiled together; `headers` only enter the hash),
    built once per sources, headers, flags, compiler, jax version and CPU. Raises
    NativeBuildError with the first compiler error."""
    flags = PORTABLE_FLAGS if portable else NATIVE_FLAGS
    compiler = _compiler()
    parts = [pathlib.Path(p).read_bytes() for p in (*sources, *headers)]
    key = hashlib.sha256(b"\0".join([*parts, " ".join(flags).encode(),
                                     _compiler_version(compiler).encode(),
                                     jax.__version__.encode(), cpu_id().encode()]))
    flavour = "-portable" if portable else ""
    out = cache_dir() / "kernels" / f"{name}{flavour}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem, suffix=".tmp")
    os.close(fd)
    # -isystem: the FFI headers are not ours to keep warning-free; -I csrc for gemm.h & co.
    cmd = [compiler, *flags, "-isystem", jax.ffi.include_dir(), "-I", str(CSRC),
           *map(str, sources), "-o", tmp]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            errors = [ln for ln in result.stderr.splitlines() if "error" in ln]
            raise NativeBuildError(f"{' '.join(cmd)} failed: "
                                   f"{(errors or result.stderr.splitlines() or ['?'])[0]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


_LIBRARIES: list = []  # never unloaded: XLA holds the handler pointers


@functools.cache
def _register(name: str, sources: tuple, headers: tuple, targets: tuple,
              portable: bool) -> ctypes.CDLL:
    library = ctypes.cdll.LoadLibrary(str(build(name, sources, headers, portable)))
    for target, symbol in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    _LIBRARIES.append(library)
    return library


@functools.cache
def _status(name: str, sources: tuple, headers: tuple, targets: tuple,
            portable: bool) -> str | None:
    """None when registered, else why not (warned once per library)."""
    try:
        _register(name, sources, headers, targets, portable)
        return None
    except (OSError, RuntimeError, AttributeError) as e:  # NativeBuildError, XLA's errors
        reason = str(e)
    warnings.warn(f"hpllm: native CPU kernel {name!r} unavailable ({reason}); the XLA path "
                  "is used instead", RuntimeWarning, stacklevel=4)
    return reason


def load_status(name: str, sources: Sequence[pathlib.Path],
                headers: Sequence[pathlib.Path] = (), targets: Mapping[str, str] = {},
                portable: bool = False) -> str | None:
    """None when `targets` ({FFI target name: exported handler symbol}) are registered for
    "cpu" (building the library on the first call), else the reason they are not."""
    if not enabled():
        return f"disabled by {ENV_SWITCH}=0"
    return _status(name, tuple(map(pathlib.Path, sources)), tuple(map(pathlib.Path, headers)),
                   tuple(sorted(targets.items())), portable)


def load_ffi(name: str, sources: Sequence[pathlib.Path],
             headers: Sequence[pathlib.Path] = (), targets: Mapping[str, str] = {},
             portable: bool = False) -> bool:
    """Whether `targets` are registered (see load_status); False + one warning if impossible."""
    return load_status(name, sources, headers, targets, portable) is None


def library(name: str, sources: Sequence[pathlib.Path], headers: Sequence[pathlib.Path] = (),
            targets: Mapping[str, str] = {}, portable: bool = False) -> ctypes.CDLL | None:
    """The loaded library of a successful `load_ffi` (for its other exported C functions),
    else None."""
    if load_status(name, sources, headers, targets, portable) is not None:
        return None
    return _register(name, tuple(map(pathlib.Path, sources)),
                     tuple(map(pathlib.Path, headers)), tuple(sorted(targets.items())), portable)


class TrainingKernels:
    """One source's family of FFI targets `prefix + kind` (`_variant` appended but for the
    native build), loaded together: the CPU training kernels' shared plumbing
    (cpu_attention.py, cpu_elementwise.py). `error` is raised, saying `what` is unavailable
    and why, where a target cannot be loaded."""

    def __init__(self, name: str, source: pathlib.Path, headers: Sequence[pathlib.Path],
                 symbols: Mapping[str, str], prefix: str, error: type, what: str):
        self.name, self.source, self.headers = name, source, tuple(headers)
        self.symbols, self.prefix, self.error, self.what = dict(symbols), prefix, error, what

    def name_of(self, kind: str, variant: str) -> str:
        return f"{self.prefix}{kind}" + ("" if variant == "native" else f"_{variant}")

    def status(self, variant: str) -> str | None:
        """None once every target of `variant` is registered, else why not."""
        return load_status(self.name, [self.source], self.headers,
                           targets={self.name_of(k, variant): s for k, s in self.symbols.items()},
                           portable=variant == "portable")

    def available(self) -> bool:
        """Whether the native build is enabled, compiled and registered (built on first call)."""
        return self.status("native") is None

    def target(self, kind: str, variant: str) -> str:
        """The FFI target of `kind`; `error` where it cannot be loaded."""
        reason = self.status(variant)
        if reason is not None:
            raise self.error(f"{self.what} unavailable: {reason}")
        return self.name_of(kind, variant)
