"""Where hpllm keeps what it fetches or measures once: $HPLLM_CACHE, else ~/.cache/hpllm.
Also JAX's persistent compilation cache there (`enable_compilation_cache`), so that a
restarted server loads its executables instead of compiling them again."""

import os
import pathlib
import zlib


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("HPLLM_CACHE") or "~/.cache/hpllm").expanduser()


_ENTRY_SUFFIX = "-cache"  # how jax's file cache names its entries (jax/_src/lru_cache.py)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def enable_compilation_cache(path: pathlib.Path | None = None) -> pathlib.Path:
    """Turn on JAX's persistent compilation cache in `path` (default cache_dir()/"jax"),
    for every executable: JAX's defaults skip those that compile in under a second, which
    on CPU is most of them. Entries a killed process left half-written are removed first
    (JAX writes them in place and never replaces an existing one, so a truncated entry would
    be a miss, and a warning, on every later start). Imports JAX: call it before compiling."""
    import jax  # not at module level: hpllm.cache is imported where JAX must not be yet

    path = pathlib.Path(path) if path is not None else cache_dir() / "jax"
    path.mkdir(parents=True, exist_ok=True)
    remove_broken_entries(path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # < 0: no minimum
    return path


def remove_broken_entries(path: pathlib.Path) -> list[str]:
    """Delete the cache entries in `path` whose compressed stream does not end (cut short
    by a kill mid-write) or does not decompress; returns their names. zstd entries (JAX
    uses zstd when the zstandard module is installed) are checked only if it is."""
    broken = []
    for entry in sorted(path.glob(f"*{_ENTRY_SUFFIX}")):
        try:
            ok = _complete(entry.read_bytes())
        except OSError:  # vanished meanwhile (another process evicted it)
            continue
        if not ok:
            broken.append(entry.name)
            entry.unlink(missing_ok=True)
    return broken


def _complete(data: bytes) -> bool:
    if data[:4] == _ZSTD_MAGIC:
        try:  # the module JAX itself would decompress with
            from compression import zstd
            decompress = zstd.decompress
        except ImportError:
            try:
                import zstandard
            except ImportError:
                return True  # cannot tell; JAX will warn and recompile if it is broken
            decompress = zstandard.ZstdDecompressor().decompress
        try:
            decompress(data)
            return True
        except Exception:  # noqa: BLE001 - each module raises its own error type
            return False
    d = zlib.decompressobj()
    try:
        for i in range(0, len(data), 1 << 20):  # a chunk at a time: bounded memory
            d.decompress(data[i:i + (1 << 20)], 1 << 20)
            while d.unconsumed_tail:
                d.decompress(d.unconsumed_tail, 1 << 20)
    except zlib.error:
        return False
    return d.eof and not d.unused_data
