import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.config import ConfigError, make_config
from hpllm.model.transformer import count_params, forward, init_params
from hpllm.perf.roofline import forward_flops_per_token, matmul_params, train_flops_per_token
from hpllm.train.data import random_batch
from hpllm.train.loop import train
from hpllm.train.state import init_state, learning_rate_schedule
from hpllm.train.step import jit_train_step


def test_learning_rate_warmup_then_cosine_to_floor():
    tc = make_config("tiny", ["--steps=100", "--warmup_steps=10", "--lr=1e-2",
                              "--min_lr_ratio=0.1"]).train
    lr = learning_rate_schedule(tc)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-3)
    assert float(lr(10)) == pytest.approx(1e-2)
    assert float(lr(55)) == pytest.approx(1e-3 + 0.5 * 9e-3, rel=1e-3)  # half-way down
    assert float(lr(100)) == pytest.approx(1e-3)
    values = [float(lr(s)) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_step_memorises_a_batch_with_float32_master_weights(compute_dtype):
    config = make_config("tiny", [f"--compute_dtype={compute_dtype}", "--warmup_steps=0",
                                  "--lr=1e-2", "--steps=30"])
    state = init_state(config, jax.random.key(0))
    step = jit_train_step(config)
    batch = random_batch(config, 1)
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(math.log(config.model.vocab_size), rel=0.05)
    assert losses[-1] < 0.5 * losses[0]
    assert int(state["step"]) == 30
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["params"]))


def test_unknown_cpu_kernel_is_refused():
    config = make_config("tiny", ["--compute_dtype=bfloat16"])
    state = jax.eval_shape(lambda: init_state(config, jax.random.key(0)))
    with pytest.raises(ValueError, match="unknown CPU kernels.*known: matmul, attention"):
        jit_train_step(config, cpu_kernels=("flash",)).lower(state, random_batch(config, 0))


def test_weight_decay_skips_norms():
    # With zero gradients, AdamW's update is pure decay: matrices shrink, norm scales do not.
    config = make_config("tiny", ["--warmup_steps=0", "--weight_decay=0.5", "--lr=0.1"])
    state = init_state(config, jax.random.key(0))
    batch = random_batch(config, 2)
    batch["loss_mask"] = np.zeros_like(batch["loss_mask"])  # loss 0 -> gradient 0
    new, _ = jit_train_step(config)(jax.tree.map(jnp.copy, state), batch)
    old_p, new_p = state["params"], new["params"]
    np.testing.assert_array_equal(new_p["final_norm"], old_p["final_norm"])
    np.testing.assert_array_equal(new_p["layers"]["attn_norm"], old_p["layers"]["attn_norm"])
    assert float(jnp.abs(new_p["layers"]["wq"]).sum()) < float(jnp.abs(old_p["layers"]["wq"]).sum())


@pytest.mark.parametrize("tie", [True, False])
def test_flop_count_matches_xla_cost_analysis(tie):
    """Our forward FLOPs (causal triangle) + the masked half XLA's dense reference also
    computes ≈ XLA's own count of the compiled forward (elementwise ops are the rest).
    One layer: XLA's cost analysis counts a scan's loop body once, not once per layer."""
    config = make_config("tiny", [f"--tie_embeddings={tie}", "--dim=128", "--n_heads=4",
                                  "--n_layers=1"])
    m, (b, s) = config.model, (2, config.train.seq_len)
    params = init_params(m, jax.random.key(0))
    tokens = jnp.zeros((b, s), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    compiled = jax.jit(lambda p, t: forward(p, t, positions, m)[0]).lower(params, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = forward_flops_per_token(m, s) * b * s
    masked_half = m.n_layers * 4 * m.n_heads * m.head_dim * b * (s * s - s * (s + 1) / 2)
    assert cost["flops"] == pytest.approx(ours + masked_half, rel=0.05)
    assert train_flops_per_token(m, s) == 3 * forward_flops_per_token(m, s)
    assert matmul_params(m) == count_params(m, embedding=False) - m.dim * (2 * m.n_layers + 1)


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """An uninterrupted run, and the same run interrupted after step 5 then resumed."""
    root = tmp_path_factory.mktemp("resume")
    args = ["--steps=12", "--log_every=1", "--eval_every=100", "--ckpt_every=100",
            "--sample_tokens=0", "--progress=false", "--eval_tokens=2048"]
    straight = train(make_config("tiny", args + [f"--out_dir={root / 'a'}"]), log=lambda s: None)

    def stop_at_5(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    b_args = args + [f"--out_dir={root / 'b'}"]
    with pytest.raises(KeyboardInterrupt):
        train(make_config("tiny", b_args), log=lambda s: None, on_step=stop_at_5)
    resumed = train(make_config("tiny", b_args + ["--resume"]), log=lambda s: None)
    return root, straight, resumed


def test_resume_reproduces_the_uninterrupted_losses_exactly(resume_runs):
    root, straight, resumed = resume_runs

    def losses(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    a, b = losses(root / "a"), losses(root / "b")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]  # bit-identical
    assert resumed.val_bpb == straight.val_bpb
    assert a[12] < a[1]


def test_a_second_fresh_run_into_the_same_out_dir_is_refused(resume_runs):
    root, _, _ = resume_runs
    before = (root / "a" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run .* pass --resume"):
        train(make_config("tiny", [f"--out_dir={root / 'a'}", "--progress=false"]),
              log=lambda s: None)
    assert (root / "a" / "metrics.jsonl").read_text() == before


def test_run_writes_its_artifacts(resume_runs):
    root, straight, _ = resume_runs
    run = root / "a"
    for name in ["metrics.jsonl", "loss.png", "tokenizer.json", "config.json"]:
        assert (run / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "tokens_per_s" not in records[0]  # the first step compiles: no throughput figure
    record = records[1]
    for key in ["loss", "tokens_per_s", "tflops_per_device", "mfu", "data_wait", "lr"]:
        assert math.isfinite(record[key]), key
    assert 0 < record["mfu"] < 1 and 0 <= record["data_wait"] <= 1
    assert 0 < straight.val_bpb < 16 and math.isfinite(straight.val_loss)
    assert (run / "checkpoints").is_dir()


@pytest.mark.slow
def test_default_preset_reaches_2_5_bits_per_byte(tmp_path):
    """The acceptance run: the default job, about 10 minutes on 2 CPU cores."""
    result = train(make_config("shakespeare", [f"--out_dir={tmp_path}", "--progress=false"]))
    assert result.val_bpb <= 2.5
