"""The training-step prediction per parallel strategy (hpllm/perf/strategy.py): the pipeline
bubble, the stage-to-stage transfers and MoE's all-to-alls against hand-computed values, and
`bench/sharding.py --json`'s records on a tiny run."""

import importlib.util
import json
import math
import pathlib

import jax
import pytest

from hpllm.config import MESH_AXES, ModelConfig, make_config
from hpllm.parallel.mesh import make_mesh
from hpllm.perf import roofline, strategy
from hpllm.perf.hardware import CHIPS, cpu_figures, measured_cpu
from hpllm.train.state import init_sharded_state, init_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHIP = CHIPS["h100"]
# dim 64, 2 layers; batch 8 x 16 tokens, float32 activations
MODEL = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=16)
MOE = ModelConfig(**{**MODEL.__dict__, "n_experts": 4, "experts_per_token": 2,
                     "capacity_factor": 1.25})
WORK = roofline.Workload("train", 8, 16)
BW = 1e9


def predict(model=MODEL, **sizes):
    return strategy.predict_step(model, WORK, CHIP, strategy.Strategy(**sizes), bandwidth=BW,
                                 compute_dtype="float32")


@pytest.mark.parametrize("schedule", strategy.SCHEDULES)
@pytest.mark.parametrize("stages, microbatches", [(2, 4), (2, 1), (4, 2)])
def test_the_bubble_is_the_schedules_idle_fraction_of_the_stage_layers(schedule, stages,
                                                                       microbatches):
    model = ModelConfig(**{**MODEL.__dict__, "n_layers": 4})
    p = strategy.predict_step(model, WORK, CHIP, strategy.Strategy(
        data=2, stage=stages, microbatches=microbatches, schedule=schedule), bandwidth=BW,
        compute_dtype="float32")
    f = (stages - 1) / (microbatches + stages - 1)  # GPipe's and (non-interleaved) 1F1B's
    assert p.bubble == pytest.approx(f)
    # the stage runs (M+P-1) time steps of one microbatch's layers: M busy, P-1 idle
    per_step = p.layers_s / microbatches
    assert p.bubble_s == pytest.approx((stages - 1) * per_step)
    assert p.layers_s > 0
    # the stage runs L/P layers: the roofline's terms for that many layers; 1F1B's last
    # stage runs the whole head in the pipeline too, GPipe's head is 1/P per stage
    one_stage = roofline.predict(ModelConfig(**{**model.__dict__, "n_layers": 4 // stages}),
                                 WORK, CHIP, roofline.MeshShape(data=2),
                                 compute_dtype="float32")
    seconds = {t.name: t.seconds for t in one_stage.terms}
    layers = seconds["weight matmuls"] + seconds["attention"] + seconds["elementwise"]
    head = seconds["output projection"] + seconds["loss (softmax x-ent)"]
    assert p.layers_s == pytest.approx(layers + (head if schedule == "1f1b" else 0))
    mine = {t.name: t.seconds for t in p.base.terms}
    assert mine["output projection"] == pytest.approx(
        seconds["output projection"] / (stages if schedule == "gpipe" else 1))


def test_the_gradient_all_reduce_moves_the_gradients_a_device_holds():
    p = predict(data=2, stage=2, microbatches=2)
    (coll,) = [c for c in p.base.collectives if c.name == "all-reduce grads"]
    params = strategy.param_opt_bytes(MODEL, p.strategy) / 3 / 4
    assert coll.bytes == 2 * params * 4  # float32 gradients, a ring all-reduce: 2 x
    assert coll.seconds == pytest.approx(2 * (2 - 1) / 2 * params * 4 / CHIP.axis_bandwidth)


def test_no_pipeline_no_bubble_no_transfers():
    p = predict(data=8)
    assert p.bubble == 0 and p.bubble_s == 0 and p.traffic == []
    assert p.step_s == pytest.approx(max(sum(t.seconds for t in p.base.terms),
                                         p.base.comm_s))


def test_stage_transfers_equal_hand_computed_bytes():
    p = predict(data=2, stage=2, microbatches=2)
    send, reduce = p.traffic
    # rows per device 8 / 2 = 4; a microbatch 2 rows x 16 tokens x 64 dims x 4 bytes
    assert send.name == "stage send" and send.bytes_each == 2 * 16 * 64 * 4 == 8192
    assert send.count == 2 * (2 + 2 - 1)  # every step of the forward scan and its transpose
    # the last stage's outputs and the input gradients (4 x 16 x 64 x 4 bytes) all-reduced
    # over 2 stages: a ring moves 2 (P-1)/P of each
    assert reduce.bytes_each == 16384 and reduce.count == 2
    assert p.transfer_s == pytest.approx((6 * 8192 + 2 * 16384) / BW)
    # tensor parallelism splits the sequence the stage sends
    assert predict(data=2, stage=2, tensor=2, microbatches=2).traffic[0].bytes_each == 4096


def test_one_f_one_b_sends_both_ways_every_unit_and_reduces_the_head():
    send, reduce, head = predict(data=2, stage=2, microbatches=2, schedule="1f1b").traffic
    assert send.bytes_each == 8192 and send.count == 2 * 2 * (2 + 2 - 1)
    assert reduce.bytes_each == 16384 and reduce.count == 1  # the input gradients
    # the head's weights (96 x 64 tied embedding + the final norm's 64, float32) gathered
    # (1/2 of them) and their gradient all-reduced (1x) over 2 stages
    assert head.bytes == pytest.approx((96 * 64 + 64) * 4 * 1.5)


def test_all_to_alls_equal_hand_computed_bytes():
    p = predict(MOE, data=2, expert=2)
    dispatch, combine = p.traffic
    slots = math.ceil(1.25 * 16 * 2 / 4)  # capacity per expert and sequence: 10
    rows = 8 // (2 * 2)  # rows split over data and expert
    sent = rows * 4 * slots * 64 * 4 / 2  # the (rows, E, C, D) buffer less the half kept
    assert sent == 10240
    for t in (dispatch, combine):
        assert t.bytes_each == sent and t.count == 2 * 2  # forward, backward; 2 layers
    assert p.all_to_all_s == pytest.approx(4 * 2 * sent / BW)
    # the forward recomputed under remat sends them again
    remat = strategy.predict_step(MOE, WORK, CHIP, strategy.Strategy(data=2, expert=2),
                                  bandwidth=BW, compute_dtype="float32", remat="full")
    assert remat.traffic[0].count == 3 * 2
    # and they wait for nothing but the layer: they add to the local time
    assert p.local_s == pytest.approx(sum(t.seconds for t in p.base.terms) + p.all_to_all_s)
    assert predict(MOE, data=8).traffic == []  # experts on every device: no all-to-all
    # in 2 pipeline stages of 1 layer, per microbatch of 1 row (8 / (2 x 2) / 2), at each
    # of the M+P-1 = 3 steps of the schedule, forward and backward
    piped = [t for t in predict(MOE, data=2, expert=2, stage=2, microbatches=2).traffic
             if t.name.startswith("all-to-all")]
    assert [(t.bytes_each, t.count) for t in piped] == [(sent / 2, 2 * 3)] * 2


def test_the_step_adds_the_terms_and_overlaps_the_collectives():
    p = predict(MOE, data=2, stage=1, expert=4)
    assert p.step_s == pytest.approx(max(p.local_s, p.base.comm_s))
    slow_link = strategy.predict_step(MOE, WORK, CHIP, strategy.Strategy(data=2, expert=4),
                                      bandwidth=1e3, compute_dtype="float32")
    assert slow_link.bound == "all-to-all"
    d = p.to_dict()
    assert d["total_ms"] == pytest.approx(1e3 * p.step_s)
    assert d["all_to_all_ms"] == pytest.approx(1e3 * p.all_to_all_s)


def test_parameter_and_optimizer_bytes_follow_the_sharding_rules():
    # per layer: q, o 2 x 64 x 64; k, v 2 x 64 x 32; MLP 3 x 64 x 192; 2 norms of 64; the
    # tied 96 x 64 embedding and the final norm outside; x 3 (AdamW's moments), 4 bytes
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192 + 2 * 64
    whole = 3 * 4 * (2 * per_layer + 96 * 64 + 64)
    assert strategy.param_opt_bytes(MODEL, strategy.Strategy()) == whole
    assert strategy.param_opt_bytes(MODEL, strategy.Strategy(stage=2, data=4)) == (
        3 * 4 * (per_layer + 96 * 64 / 2 + 64))
    # tensor=4 splits the 4 heads, the MLP and the vocab, not the 2 KV heads
    tp = 2 * (2 * 64 * 64 / 4 + 2 * 64 * 32 + 3 * 64 * 192 / 4 + 2 * 64) + 96 * 64 / 4 + 64
    assert strategy.param_opt_bytes(MODEL, strategy.Strategy(tensor=4)) == 3 * 4 * tp
    # experts split over `expert`, the (64, 4) router stays whole
    moe = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 64 * 4 + 3 * 64 * 192 * 4 / 2 + 2 * 64)
    assert strategy.param_opt_bytes(MOE, strategy.Strategy(expert=2)) == (
        3 * 4 * (moe + 96 * 64 + 64))


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="zigzag"), "schedule must be"),
    (dict(data=0), ">= 1"),
    (dict(stage=3), "not divisible into 3 stages"),
    (dict(data=2, stage=2, microbatches=3), "does not split"),
    (dict(data=3), "does not split"),
])
def test_bad_strategies_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        predict(**kwargs)


def test_link_bandwidth_is_a_cpu_copy_or_an_interconnect_link():
    assert strategy.link_bandwidth(CHIP) == CHIP.link_bandwidth
    assert strategy.link_bandwidth(measured_cpu()) == cpu_figures()["copy_bandwidth"] / 2


# ------------------------------------------------------------------ bench/sharding.py --json

def load_bench():
    spec = importlib.util.spec_from_file_location("bench_sharding", ROOT / "bench" /
                                                  "sharding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shard_bytes_on_one_device(config):
    """Parameters + optimizer state bytes that device 0 holds, from the sharded arrays."""
    state = init_sharded_state(config, make_mesh(config.mesh), jax.random.key(0))
    device = jax.devices()[0]
    return sum(s.data.nbytes for part in ("params", "opt_state")
               for leaf in jax.tree.leaves(state[part]) for s in leaf.addressable_shards
               if s.device == device)


TINY = "--compute_dtype=float32 --seq_len=16 --batch_size=16"


def test_json_has_one_record_per_strategy_with_mesh_schedule_and_memory(tmp_path):
    path = tmp_path / "sharding.json"
    load_bench().main(["--preset", "tiny", "--steps", "1", "--strategies", "pp2_gpipe",
                       "--overrides", TINY, "--json", str(path)])
    (row,) = json.loads(path.read_text())
    assert row["strategy"] == "pp2_gpipe" and row["schedule"] == "gpipe"
    assert row["mesh"] == {a: {"data": 4, "stage": 2}.get(a, 1) for a in MESH_AXES}
    # every parameter and moment is split over the 2 stages (data parallelism replicates)
    config = make_config("tiny", TINY.split())
    state = jax.eval_shape(lambda: init_state(config, jax.random.key(0)))
    whole = sum(x.size * x.dtype.itemsize for part in ("params", "opt_state")
                for x in jax.tree.leaves(state[part]))
    assert row["param_opt_bytes_per_device"] == pytest.approx(whole / 2, rel=1e-3)
    p = row["predicted"]
    assert p["bubble_fraction"] == pytest.approx(1 / 5)
    assert p["bubble_ms"] > 0 and p["transfer_ms"] > 0 and p["all_to_all_ms"] == 0
    assert row["step_ms"] > 0
    assert row["measured_over_predicted"] == pytest.approx(row["step_ms"] / p["total_ms"])


@pytest.mark.slow
def test_every_strategy_runs_and_its_memory_matches_the_napkin(tmp_path):
    path = tmp_path / "sharding.json"
    bench = load_bench()
    extra = " --n_layers=4"
    bench.main(["--preset", "tiny", "--steps", "1", "--overrides", TINY + extra,
                "--json", str(path)])
    rows = {r["strategy"]: r for r in json.loads(path.read_text())}
    assert set(rows) == set(bench.STRATEGIES)  # every row ran (a refused one is left out)
    for name, row in rows.items():
        args = (TINY + extra).split() + bench.STRATEGIES[name][1]
        mesh = ",".join(f"{a}={n}" for a, n in row["mesh"].items())
        assert row["param_opt_bytes_per_device"] == shard_bytes_on_one_device(
            make_config("tiny", args + [f"--mesh={mesh}"])), name
        assert row["pred_param_opt_bytes_per_device"] == pytest.approx(
            row["param_opt_bytes_per_device"], rel=0.01), name
        assert (row["predicted"]["all_to_all_ms"] > 0) == ("moe" in name), name
        assert (row["predicted"]["bubble_ms"] > 0) == (row["mesh"]["stage"] > 1), name
