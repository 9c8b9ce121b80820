"""Training-state checkpoints on Orbax: save, latest_step, restore.

One checkpoint is one Orbax step directory with two items:

    <directory>/<step>/state/      the array pytree (StandardSave: OCDBT + zarr)
    <directory>/<step>/metadata/   JSON: config, data-loader position, ...

Completeness, as Orbax 0.12.8 does it (read from `orbax/checkpoint/_src/path/
atomicity.py`): on a local/POSIX filesystem it writes everything into
`<step>.orbax-checkpoint-tmp`, writes `commit_success.txt` inside it, then
renames the directory to `<step>`. On GCS it writes `<step>/` in place and the
commit file alone marks completion. Orbax's own reader on a local filesystem
checks only the name (no tmp suffix), so a `<step>/` missing its commit file
(a partial copy, or an in-place write cut short) would pass it; `complete_steps`
therefore also requires the commit file, which every Orbax 0.12.8 save writes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

__all__ = [
    "CheckpointError",
    "save",
    "latest_step",
    "complete_steps",
    "restore",
    "restore_metadata",
]

_STATE, _METADATA = "state", "metadata"
_COMMIT_FILE = ocp.path.atomicity.COMMIT_SUCCESS_FILE  # "commit_success.txt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the requested state."""


# Orbax logs dozens of INFO lines per save/restore through absl; keep its
# warnings but drop its INFO/DEBUG so training logs stay readable.
# To see them again: logging.getLogger("absl").removeFilter(ORBAX_LOG_FILTER).
_ORBAX_SOURCE_DIR = os.path.dirname(os.path.dirname(ocp.__file__))


class _QuietOrbax(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(
            _ORBAX_SOURCE_DIR
        )


ORBAX_LOG_FILTER = _QuietOrbax()
_absl_logger = logging.getLogger("absl")
if not any(type(f).__name__ == "_QuietOrbax" for f in _absl_logger.filters):
    _absl_logger.addFilter(ORBAX_LOG_FILTER)


def _path(directory: str | os.PathLike) -> epath.Path:
    # Orbax wants absolute paths; leave URLs (gs://...) alone.
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _manager(path: epath.Path, *, keep: int | None = None, create: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=create,
        # Synchronous: save() returns only after the rename has committed.
        enable_async_checkpointing=False,
        # Writers sweep away tmp dirs left by killed saves; readers touch nothing.
        cleanup_tmp_directories=create,
    )
    return ocp.CheckpointManager(path, options=options)


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """Steps under `directory` whose save committed, ascending."""
    path = _path(directory)
    if not path.is_dir():
        return []
    # find_all applies Orbax's finalization check (skips *.orbax-checkpoint-tmp).
    found = ocp.path.step.standard_name_format().find_all(path)
    return sorted(m.step for m in found if (m.path / _COMMIT_FILE).exists())


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step, or None if there is none."""
    steps = complete_steps(directory)
    return steps[-1] if steps else None


def save(
    directory: str | os.PathLike,
    step: int,
    state: Any,
    metadata: dict[str, Any],
    *,
    keep: int | None = 2,
) -> None:
    """Writes checkpoint `step` atomically, blocks until committed, prunes to `keep`.

    `state` is any pytree of arrays (typed PRNG keys and optax namedtuples
    included); `metadata` must be JSON-serialisable. Pruning keeps the step
    just written plus the `keep - 1` highest other steps (Orbax's LatestN over
    existing steps sorted, then this save); `keep=None` keeps all.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    path = _path(directory)
    step = int(step)
    args = ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(metadata)}
    )
    with _manager(path, keep=keep, create=True) as mngr:
        try:
            # force: Orbax would otherwise silently skip a step <= its latest one.
            mngr.save(step, args=args, force=True)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise CheckpointError(f"checkpoint step {step} already exists in {path}") from e
        mngr.wait_until_finished()


def _resolve_step(path: epath.Path, step: int | None) -> int:
    steps = complete_steps(path)
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {path}")
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise CheckpointError(
            f"no complete checkpoint for step {step} in {path} (complete steps: {steps})"
        )
    return int(step)


def _tree_mismatch(state_dir: epath.Path, abstract_state: Any) -> list[str]:
    """Keys where the saved tree and `abstract_state` differ in presence or shape."""
    try:
        saved = ocp.StandardCheckpointHandler().metadata(state_dir)
        saved = ocp.tree.to_flat_dict(getattr(saved, "tree", saved))
        wanted = ocp.tree.to_flat_dict(abstract_state)
    except Exception:  # unreadable metadata: leave the verdict to Orbax's restore
        return []
    name = ".".join
    diffs = [f"missing from checkpoint: {name(k)}" for k in sorted(wanted.keys() - saved.keys())]
    diffs += [f"only in checkpoint: {name(k)}" for k in sorted(saved.keys() - wanted.keys())]
    for k in sorted(wanted.keys() & saved.keys()):
        want, have = wanted[k], saved[k]
        # Typed keys are stored as key_data, whose shape differs by design.
        if jax.dtypes.issubdtype(getattr(want, "dtype", None), jax.dtypes.prng_key):
            continue
        if hasattr(want, "shape") and hasattr(have, "shape"):
            if tuple(want.shape) != tuple(have.shape):
                diffs.append(
                    f"{name(k)}: checkpoint shape {tuple(have.shape)}, requested {tuple(want.shape)}"
                )
    return diffs


def restore(
    directory: str | os.PathLike, step: int | None, abstract_state: Any
) -> tuple[Any, dict[str, Any]]:
    """Loads (state, metadata) of `step` (None: the latest complete one).

    `abstract_state` is a pytree of jax.ShapeDtypeStruct (e.g. from
    jax.eval_shape) or arrays; leaves come back with its shardings and dtypes
    (Orbax casts if the saved dtype differs), so a checkpoint saved on one mesh
    restores directly into another layout. Leaves without a sharding fall back
    to the sharding recorded at save time.
    """
    path = _path(directory)
    step = _resolve_step(path, step)
    args = ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract_state), _METADATA: ocp.args.JsonRestore()}
    )
    state_dir = path / str(step) / _STATE
    # Check against the saved tree metadata first (one small JSON read): Orbax
    # reports only the first bad shape, without its key, and only after
    # starting and abandoning the reads of every other array.
    if diffs := _tree_mismatch(state_dir, abstract_state):
        more = f"; ... ({len(diffs) - 8} more)" if len(diffs) > 8 else ""
        raise CheckpointError(
            f"checkpoint {state_dir} does not match abstract_state: {'; '.join(diffs[:8])}{more}"
        )
    with _manager(path) as mngr:
        try:
            out = mngr.restore(step, args=args)
        except ValueError as e:  # whatever else Orbax finds incompatible
            raise CheckpointError(
                f"checkpoint {state_dir} does not match abstract_state: {e}"
            ) from e
    return out[_STATE], out[_METADATA]


def restore_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Loads only the JSON metadata of `step` (None: the latest complete one)."""
    path = _path(directory)
    step = _resolve_step(path, step)
    with _manager(path) as mngr:
        out = mngr.restore(step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))
    return out[_METADATA]
