"""Tests for hpllm.checkpoints.orbax_io (CPU; subprocesses for kill and multi-device cases)."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from hpllm.checkpoints import orbax_io
from hpllm.checkpoints.distilled import load_distilled, save_distilled
from hpllm.checkpoints.orbax_io import CheckpointError
from hpllm.config import make_config
from hpllm.model.transformer import init_params

REPO = Path(__file__).resolve().parents[1]
TMP_SUFFIX = ocp.path.atomicity.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp"
COMMIT_FILE = ocp.path.atomicity.COMMIT_SUCCESS_FILE  # "commit_success.txt"


def _train_state(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "embed": jax.random.normal(k1, (64, 32), jnp.bfloat16),
        "mlp": {"w": jax.random.normal(k2, (32, 48), jnp.float32), "b": jnp.zeros((48,), jnp.float32)},
    }
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: jax.random.normal(k3, p.shape, p.dtype), params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-trivial mu/nu, count=1
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(7), "rng": jax.random.key(seed + 1)}


def _meta(step):
    return {"config": {"d_model": 32, "name": "tiny"}, "data": {"step": step, "epoch": 1}}


def _assert_bit_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if jnp.issubdtype(w.dtype, jax.dtypes.prng_key):
            assert g.dtype == w.dtype
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        # Compare raw bits so bfloat16 and NaN payloads are checked exactly.
        np.testing.assert_array_equal(
            np.asarray(g).view(f"u{g.dtype.itemsize}"), np.asarray(w).view(f"u{w.dtype.itemsize}")
        )


def _run_python(code, *args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, **kw)


def test_round_trip_bit_exact(tmp_path):
    state = _train_state()
    assert state["params"]["embed"].dtype == jnp.bfloat16
    orbax_io.save(tmp_path, 7, state, _meta(7))
    restored, meta = orbax_io.restore(tmp_path, 7, jax.eval_shape(lambda: state))
    _assert_bit_equal(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert int(restored["opt_state"][0].count) == 1
    assert meta == _meta(7)
    assert orbax_io.restore_metadata(tmp_path, 7) == _meta(7)
    # A restored key must still drive the same random stream.
    np.testing.assert_array_equal(
        jax.random.normal(restored["rng"], (4,)), jax.random.normal(state["rng"], (4,))
    )


def test_raw_key_data_and_latest_default(tmp_path):
    state = dict(_train_state(), rng=jax.random.key_data(jax.random.key(3)))
    orbax_io.save(tmp_path / "nested" / "run", 1, state, _meta(1))  # directory created
    orbax_io.save(tmp_path / "nested" / "run", 2, state, _meta(2))
    restored, meta = orbax_io.restore(tmp_path / "nested" / "run", None, jax.eval_shape(lambda: state))
    _assert_bit_equal(restored, state)
    assert meta["data"]["step"] == 2
    assert orbax_io.restore_metadata(tmp_path / "nested" / "run")["data"]["step"] == 2


def test_keep_retention(tmp_path):
    state = {"w": jnp.arange(6, dtype=jnp.float32)}
    for step in (10, 20, 30, 40):
        orbax_io.save(tmp_path, step, {"w": state["w"] + step}, _meta(step), keep=2)
    assert orbax_io.complete_steps(tmp_path) == [30, 40]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["30", "40"]
    orbax_io.save(tmp_path, 50, state, _meta(50), keep=3)
    assert orbax_io.complete_steps(tmp_path) == [30, 40, 50]
    restored, _ = orbax_io.restore(tmp_path, 30, jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(restored["w"], state["w"] + 30)


def test_errors(tmp_path):
    state = _train_state()
    abstract = jax.eval_shape(lambda: state)
    assert orbax_io.latest_step(tmp_path / "absent") is None
    assert orbax_io.latest_step(tmp_path) is None
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*absent"):
        orbax_io.restore(tmp_path / "absent", None, abstract)
    with pytest.raises(CheckpointError, match="no complete checkpoint in"):
        orbax_io.restore_metadata(tmp_path)

    orbax_io.save(tmp_path, 5, state, _meta(5))
    with pytest.raises(CheckpointError, match=r"step 6 .*complete steps: \[5\]"):
        orbax_io.restore(tmp_path, 6, abstract)
    with pytest.raises(CheckpointError, match="step 5 already exists"):
        orbax_io.save(tmp_path, 5, state, _meta(5))
    with pytest.raises(ValueError):
        orbax_io.save(tmp_path, 6, state, _meta(6), keep=0)


def test_mismatched_structure_names_the_key(tmp_path):
    state = _train_state()
    orbax_io.save(tmp_path, 1, state, _meta(1))

    extra = dict(state, params=dict(state["params"], head=jnp.zeros((32, 8))))
    with pytest.raises(CheckpointError, match=r"(?s)does not match abstract_state.*params\.head") as e:
        orbax_io.restore(tmp_path, 1, jax.eval_shape(lambda: extra))
    assert str(tmp_path) in str(e.value)

    missing = dict(state, params={"embed": state["params"]["embed"]})
    with pytest.raises(CheckpointError, match=r"only in checkpoint: params\.mlp\.b"):
        orbax_io.restore(tmp_path, 1, jax.eval_shape(lambda: missing))

    wrong_shape = jax.eval_shape(lambda: state)
    wrong_shape["params"]["mlp"]["w"] = jax.ShapeDtypeStruct((32, 49), jnp.float32)
    with pytest.raises(CheckpointError, match=r"params\.mlp\.w: checkpoint shape \(32, 48\), requested \(32, 49\)"):
        orbax_io.restore(tmp_path, 1, wrong_shape)


_KILLED_WRITER = """
    import sys
    import numpy as np, jax.numpy as jnp
    from hpllm.checkpoints import orbax_io
    # ~320 MB of incompressible data so the write takes long enough to be interrupted.
    rng = np.random.default_rng(0)
    state = {f"w{i}": jnp.asarray(rng.random((2000, 10000), dtype=np.float32)) for i in range(4)}
    print("saving", flush=True)
    orbax_io.save(sys.argv[1], 2, state, {"data": {"step": 2}})
    print("finished", flush=True)
"""


def test_killed_save_is_ignored(tmp_path):
    small = {"w": jnp.arange(10, dtype=jnp.float32)}
    orbax_io.save(tmp_path, 1, small, _meta(1))

    tmp_dir = tmp_path / f"2{TMP_SUFFIX}"
    proc = _run_python(_KILLED_WRITER, tmp_path, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 45
    try:
        while not tmp_dir.exists():
            assert proc.poll() is None, f"writer exited before its save started: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "writer never started saving"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)  # mid-write: Orbax is filling the tmp dir
    finally:
        proc.kill()
        out = proc.communicate()[0].decode()
    assert "finished" not in out, "save completed before the kill; the test did not interrupt it"
    assert proc.returncode == -signal.SIGKILL
    assert tmp_dir.is_dir() and not (tmp_path / "2").exists()

    assert orbax_io.complete_steps(tmp_path) == [1]
    assert orbax_io.latest_step(tmp_path) == 1
    with pytest.raises(CheckpointError, match="no complete checkpoint for step 2"):
        orbax_io.restore(tmp_path, 2, {"w": jax.ShapeDtypeStruct((2000, 10000), jnp.float32)})
    restored, meta = orbax_io.restore(tmp_path, None, jax.eval_shape(lambda: small))
    np.testing.assert_array_equal(restored["w"], small["w"])
    assert meta == _meta(1)

    # The next save sweeps the leftover tmp dir and may reuse the step number.
    orbax_io.save(tmp_path, 2, small, _meta(2))
    assert not tmp_dir.exists()
    assert orbax_io.latest_step(tmp_path) == 2


def test_constructed_incomplete_checkpoints_are_ignored(tmp_path):
    """The two states an interrupted Orbax 0.12.8 save can leave, built deterministically.

    Local filesystems: Orbax writes `<step>.orbax-checkpoint-tmp/`, puts
    commit_success.txt in it, then renames it to `<step>/` -- a kill before the
    rename leaves the tmp dir (even when every byte was already written).
    Commit-file mode (GCS): `<step>/` is written in place and commit_success.txt
    comes last -- a kill leaves `<step>/` without it. Orbax's reader on a local
    path accepts such a dir; complete_steps does not.
    """
    state = {"w": jnp.arange(10, dtype=jnp.float32)}
    orbax_io.save(tmp_path, 1, state, _meta(1))
    # Fully written but never renamed.
    shutil.copytree(tmp_path / "1", tmp_path / f"2{TMP_SUFFIX}")
    # Renamed/in place but without its commit marker.
    shutil.copytree(tmp_path / "1", tmp_path / "3")
    (tmp_path / "3" / COMMIT_FILE).unlink()
    assert ocp.path.step.is_path_finalized(tmp_path / "3")  # Orbax alone would accept it
    assert not ocp.path.step.is_path_finalized(tmp_path / f"2{TMP_SUFFIX}")

    assert orbax_io.complete_steps(tmp_path) == [1]
    assert orbax_io.latest_step(tmp_path) == 1
    for step in (2, 3):
        with pytest.raises(CheckpointError, match=f"no complete checkpoint for step {step}"):
            orbax_io.restore(tmp_path, step, jax.eval_shape(lambda: state))
    restored, _ = orbax_io.restore(tmp_path, None, jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(restored["w"], state["w"])


_RESHARD = """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from hpllm.checkpoints import orbax_io
    devs = np.array(jax.devices())
    assert len(devs) == 4, devs
    x = jnp.arange(8 * 12, dtype=jnp.float32).reshape(8, 12)
    y = (jnp.arange(16) * 3).astype(jnp.bfloat16)
    row = NamedSharding(Mesh(devs, ("x",)), P("x", None))
    state = {"x": jax.device_put(x, row), "y": jax.device_put(y, NamedSharding(Mesh(devs, ("x",)), P("x")))}
    assert len(state["x"].addressable_shards) == 4 and state["x"].addressable_shards[0].data.shape == (2, 12)
    orbax_io.save(sys.argv[1], 1, state, {"mesh": "x4"})

    targets = {
        # Same devices, 2x2 mesh, both dims split the other way round.
        "2x2": (NamedSharding(Mesh(devs.reshape(2, 2), ("a", "b")), P("b", "a")),
                NamedSharding(Mesh(devs.reshape(2, 2), ("a", "b")), P(("a", "b")))),
        # A different, smaller mesh: columns split over the last two devices.
        "pair": (NamedSharding(Mesh(devs[2:], ("m",)), P(None, "m")),
                 NamedSharding(Mesh(devs[2:], ("m",)), P())),
    }
    for name, (sx, sy) in targets.items():
        abstract = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sx),
                     "y": jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=sy)}
        got, meta = orbax_io.restore(sys.argv[1], 1, abstract)
        assert got["x"].sharding == sx and got["y"].sharding == sy, (name, got["x"].sharding)
        assert got["y"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got["x"]), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(got["y"]).view(np.uint16), np.asarray(y).view(np.uint16))
        assert meta == {"mesh": "x4"}
        print(name, [s.data.shape for s in got["x"].addressable_shards])
    print("RESHARD_OK")
"""


def test_restore_onto_other_sharding(tmp_path):
    proc = _run_python(
        _RESHARD,
        tmp_path,
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0 and "RESHARD_OK" in out, out
    assert "2x2 [(4, 6), (4, 6), (4, 6), (4, 6)]" in out, out
    assert "pair [(8, 6), (8, 6)]" in out, out


def test_orbax_info_logs_are_quiet(tmp_path, caplog):
    with caplog.at_level("INFO"):
        orbax_io.save(tmp_path, 1, {"w": jnp.ones(3)}, _meta(1))
        orbax_io.restore(tmp_path, 1, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    orbax_records = [r for r in caplog.records if "/orbax/" in r.pathname]
    assert orbax_records == [], [r.getMessage() for r in orbax_records[:3]]


def test_distilled_draft_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HPLLM_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="hpllm distill"):
        load_distilled("tiny-target")
    config = make_config("tiny", n_layers=2).model
    params = init_params(config, jax.random.key(3))
    record = save_distilled("tiny-target", config, params, steps=7, final_kl=0.5)
    assert record["steps"] == 7 and record["model"] == "tiny-target"
    got_config, got = load_distilled("tiny-target")
    assert got_config == config
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
