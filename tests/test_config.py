import subprocess
import sys

import pytest

from hpllm.config import (ATTENTION_IMPLEMENTATIONS, PRESETS, Config, ConfigError, make_config,
                          parse_overrides)
from hpllm.model.attention import IMPLEMENTATIONS


def test_presets_validate_and_differ():
    configs = {name: make_config(name) for name in PRESETS}
    assert configs["tiny"].model.dim < configs["shakespeare"].model.dim < configs["small"].model.dim
    assert all(c.preset == name for name, c in configs.items())


def test_overrides_are_typed_and_reach_both_sections():
    c = make_config("tiny", ["--n_layers=3", "--lr=2e-3", "--tie_embeddings=false",
                             "--model.rope_theta=5e5", "--train.seed=7", "--out-dir=/tmp/x"])
    assert (c.model.n_layers, c.train.lr, c.model.tie_embeddings) == (3, 2e-3, False)
    assert (c.model.rope_theta, c.train.seed, c.train.out_dir) == (5e5, 7, "/tmp/x")
    assert isinstance(c.model.rope_theta, float) and isinstance(c.model.n_layers, int)
    assert make_config("tiny", n_layers=5).model.n_layers == 5


def test_flag_without_value_means_true():
    assert parse_overrides(["--resume"]) == {"resume": "true"}
    assert make_config("tiny", ["--resume"]).train.resume is True


@pytest.mark.parametrize("args, message", [
    (["--n_layers=abc"], "n_layers expects int, got 'abc'"),
    (["--lr=fast"], "lr expects float"),
    (["--lr=nan"], "lr expects float"),
    (["--tie_embeddings=maybe"], "tie_embeddings expects bool"),
    (["--n_layer=2"], "unknown config key 'n_layer'"),
    (["--model.lr=1"], "unknown config key 'model.lr'"),
    (["--optim.lr=1"], "unknown config section 'optim'"),
    (["n_layers"], "expected --key=value"),
    (["--n_kv_heads=3"], "n_heads (4) must be divisible by n_kv_heads (3)"),
    (["--n_kv_heads=8"], "must be divisible by n_kv_heads (8)"),
    (["--dim=66"], "dim (66) must be divisible by n_heads (4)"),
    (["--seq_len=128"], "seq_len (128) exceeds max_seq_len (64)"),
    (["--tokenizer=char"], "tokenizer must be 'bpe' or 'byte'"),
    (["--remat=some"], "remat must be none, full or dots"),
    (["--steps=0"], "steps must be positive"),
    (["--val_fraction=1.5"], "val_fraction must be in (0, 1)"),
    (["--compute_dtype=float64"], "compute_dtype must be float32, bfloat16 or float16"),
    (["--param_dtype=float16"], "param_dtype must be float32 or bfloat16"),
])
def test_bad_overrides_name_the_problem(args, message):
    with pytest.raises(ConfigError) as err:
        make_config("tiny", args)
    assert message in str(err.value)


def test_yaml_preset_layers_on_a_builtin(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: tiny\nmodel:\n  n_layers: 3\nlr: 0.01\n")
    c = make_config(str(path), ["--seed=3"])
    assert (c.model.n_layers, c.model.dim, c.train.lr, c.train.seed) == (3, 64, 0.01, 3)
    assert c.preset == "mine"
    path.write_text("n_layers: three\n")
    with pytest.raises(ConfigError, match="n_layers expects int"):
        make_config(str(path))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        make_config("nope")
    with pytest.raises(ConfigError, match="not found"):
        make_config(str(tmp_path / "missing.yaml"))


def test_round_trip_through_dict():
    c = make_config("small", ["--n_layers=2"])
    assert Config.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("args, message", [
    (["--n_layers=abc"], "n_layers expects int, got 'abc'"),
    (["--n_heads=8", "--n_kv_heads=3"], "n_heads (8) must be divisible by n_kv_heads (3)"),
    (["--dim=100"], "dim (100) must be divisible by n_heads (8)"),
    (["--data_dir=/nonexistent/hpllm-data"], "/nonexistent/hpllm-data"),
])
def test_cli_bad_input_is_one_clear_line_and_no_compilation(args, message, tmp_path):
    """The CLI stops before any JAX work: one error line on stderr, exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "hpllm.cli", "train", f"--out_dir={tmp_path}",
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpllm: error:"), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()


def test_attention_names_in_config_are_the_models_registry():
    assert ATTENTION_IMPLEMENTATIONS == tuple(IMPLEMENTATIONS)
