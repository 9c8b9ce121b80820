"""Multi-process training: start-up settings, per-process batch rows, and a real 2-process
`jax.distributed` run on localhost (gloo collectives) against a single-process run."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from hpllm.config import ConfigError, MeshConfig
from hpllm.parallel import distributed as D
from hpllm.parallel import sharding as S
from hpllm.parallel.mesh import make_mesh
from hpllm.train.data import PackedDataset
from known_hardware import write_known_figures


def test_settings_come_from_flags_or_environment(monkeypatch):
    env = {"HPLLM_COORDINATOR_ADDRESS": "127.0.0.1:1234", "HPLLM_NUM_PROCESSES": "2",
           "HPLLM_PROCESS_ID": "1"}
    assert D.settings_from_env(environ=env) == {"coordinator_address": "127.0.0.1:1234",
                                                "num_processes": 2, "process_id": 1}
    assert D.settings_from_env(process_id=0, environ=env)["process_id"] == 0  # flags win
    assert D.settings_from_env(environ={})["coordinator_address"] is None
    for kwargs, message in [
        (dict(num_processes=2), "need a coordinator address"),
        (dict(coordinator_address="h:1", num_processes=2), "needs num_processes and process_id"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "process_id must be"),
        (dict(coordinator_address="nohost", num_processes=2, process_id=0), "host:port"),
        (dict(coordinator_address="h:1", num_processes="two", process_id=0), "expects an int"),
    ]:
        with pytest.raises(ConfigError, match=message):
            D.settings_from_env(**kwargs, environ={})
    for name in D.ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert D.initialize() is False  # nothing described: one process, nothing started


def _dataset(batch_size=6):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 300, 5000).astype(np.int32)
    segments = np.repeat(np.arange(1, 11), 500).astype(np.int32)
    return PackedDataset(tokens, segments, seq_len=16, batch_size=batch_size, seed=7,
                         token_bytes=np.ones(300, np.float32), pad_id=0)


@pytest.mark.parametrize("step", [0, 51, 52])  # 52 straddles an epoch end (312 windows / 6)
def test_row_ranges_of_batch_at_are_rows_of_the_whole_batch(step):
    data = _dataset()
    whole = data.batch_at(step)
    for start, stop in [(0, 6), (0, 3), (3, 6), (4, 5)]:
        part = data.batch_at(step, start, stop)
        for name in whole:
            np.testing.assert_array_equal(part[name], whole[name][start:stop], err_msg=name)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")
def test_global_batch_builds_each_row_range_once():
    data = _dataset(batch_size=8)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # rows 4 ways, 2 replicas each
    asked = []

    def rows(a, b):
        asked.append((a, b))
        return data.batch_at(3, a, b)

    batch = D.global_batch(rows, 8, S.batch_sharding(mesh))
    assert sorted(asked) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    whole = data.batch_at(3)
    for name, value in batch.items():
        assert value.sharding.is_equivalent_to(S.batch_sharding(mesh), value.ndim)
        np.testing.assert_array_equal(np.asarray(value), whole[name])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(out_dir, data_dir, steps):
    return [sys.executable, "-m", "hpllm.cli", "train", "--preset", "tiny", "--mesh", "data=-1",
            f"--data_dir={data_dir}", "--tokenizer=byte", "--val_fraction=0.2",
            f"--steps={steps}", "--log_every=1", f"--ckpt_every={steps}", "--eval_every=1000",
            "--eval_tokens=512", "--sample_tokens=0", "--progress=false",
            "--compute_dtype=float32", "--warmup_steps=1", f"--out_dir={out_dir}"]


def _losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in records if "loss" in r],
            [r["val_loss"] for r in records if "val_loss" in r])


@pytest.mark.parametrize("steps", [2, pytest.param(6, marks=pytest.mark.slow)])
def test_two_processes_train_like_one(tmp_path, steps):
    """2 processes x 2 CPU devices (gloo) vs 1 process x 4 devices: the same global mesh
    (data=4) and batches, so the same losses up to the order of float32 sums."""
    data_dir = tmp_path / "docs"
    data_dir.mkdir()
    rng = np.random.default_rng(1)
    words = ["the", "king", "and", "queen", "of", "a", "land", "sea", "night", "day", "is"]
    for i in range(12):
        (data_dir / f"doc{i:02d}.txt").write_text(
            " ".join(rng.choice(words, 1500)) + "\n")
    env = {**os.environ, "HPLLM_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    # known CPU figures (the MFU log only): else each of the 3 processes measures the machine
    write_known_figures(tmp_path / "cache", 4, all_gather_bandwidth_2dev=1e9)
    env2 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = _free_port()
    procs = [subprocess.Popen(
        _train_args(tmp_path / "two", data_dir, steps) + [
            f"--coordinator-address=127.0.0.1:{port}", "--num-processes=2",
            f"--process-id={i}"], env=env2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "over 4 devices in 2 process(es)" in outputs[0]
    assert "step" not in outputs[1] and "final:" not in outputs[1]  # only process 0 logs
    env4 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    single = subprocess.run(_train_args(tmp_path / "one", data_dir, steps), env=env4,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:] + single.stdout[-3000:]
    (two, two_val), (one, one_val) = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two) == len(one) == steps
    np.testing.assert_allclose(two, one, rtol=1e-5)
    np.testing.assert_allclose(two_val, one_val, rtol=1e-5)
