"""The training loop: data, step, logging (tokens/s, TFLOP/s, MFU, data wait), evaluation in
bits per byte, checkpoints with exact resume, and a sample at the end."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from hpllm.checkpoints import orbax_io
from hpllm.config import Config, ConfigError
from hpllm.infer.generate import generate
from hpllm.model.transformer import count_params
from hpllm.parallel import distributed, sharding
from hpllm.parallel import mesh as mesh_lib
from hpllm.parallel.pipeline import bubble_fraction
from hpllm.perf.hardware import current_chip
from hpllm.perf.roofline import train_flops_per_token
from hpllm.train import data as data_lib
from hpllm.train.state import init_sharded_state, init_state, state_shardings
from hpllm.train.step import jit_eval_step, jit_train_step


@dataclasses.dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: float
    val_bpb: float
    seconds: float
    history: list  # the metrics records of this run


def evaluate(params, batches, eval_fn) -> dict:
    """Mean loss (nats/token) and bits per byte over the given batches."""
    total = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in batches:
        out = eval_fn(params, batch)
        for k in total:
            total[k] += float(out[k])
    if total["tokens"] == 0 or total["bytes"] == 0:
        raise ValueError("evaluation saw no tokens")
    return {"val_loss": total["nll"] / total["tokens"],
            "val_bpb": total["nll"] / math.log(2) / total["bytes"],
            "val_tokens": int(total["tokens"])}


class MetricsLog:
    """metrics.jsonl, one record per line; on resume, records after the restored step (from
    the interrupted run's tail that no checkpoint covers) are dropped."""

    def __init__(self, path: pathlib.Path, resume_step: int | None, write: bool = True):
        self.path, self.write = path, write  # write=False: a non-primary process keeps records
        self.records = []
        if resume_step is not None and path.exists():
            self.records = [r for r in map(json.loads, path.read_text().splitlines())
                            if r["step"] <= resume_step]
        if write:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        self.records.append(record)
        if not self.write:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, png: pathlib.Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)


def _abstract_state(config: Config, mesh=None):
    """Shapes/dtypes/shardings of the state, without allocating it (for restore; on a mesh,
    each process reads only its shards, whatever mesh the checkpoint was saved from)."""
    shapes = jax.eval_shape(lambda: init_state(config, jax.random.key(0)))
    if mesh is not None:
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, state_shardings(config, mesh))
    sharding_ = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_),
                        shapes)


def _check_resumable(saved: dict, config: Config) -> None:
    if saved["model"] != dataclasses.asdict(config.model):
        diff = [k for k in saved["model"] if saved["model"][k] != getattr(config.model, k)]
        raise ConfigError(f"cannot resume: the checkpoint's model config differs in {diff}")
    for key in ("tokenizer", "seq_len", "batch_size", "seed", "dataset", "data_dir",
                "val_fraction"):
        if saved["train"][key] != getattr(config.train, key):
            raise ConfigError(f"cannot resume: {key} was {saved['train'][key]!r} in the "
                              f"checkpoint, now {getattr(config.train, key)!r}")


def train(config: Config, log=print, on_step=None) -> TrainResult:
    """Run the job `config` describes. Everything the CLI prints goes through `log`;
    `on_step(step, metrics)` (if given) is called after every step, e.g. to stop early by
    raising KeyboardInterrupt, which saves a checkpoint first."""
    config.validate()
    tc = config.train
    t_start = time.perf_counter()
    mesh = sharding.training_mesh(config)  # None: one device
    primary = distributed.is_primary()  # only process 0 logs and writes the run's files
    if not primary:
        log = lambda *args, **kwargs: None  # noqa: E731
    out_dir = pathlib.Path(tc.out_dir)
    ckpt_dir = out_dir / "checkpoints"

    resume_step = orbax_io.latest_step(ckpt_dir)
    if resume_step is not None and not tc.resume:
        raise ConfigError(f"{out_dir} already holds a run (checkpoint at step {resume_step}): "
                          "pass --resume to continue it, or choose another --out_dir")
    if tc.resume and resume_step is None:
        log(f"no checkpoint in {ckpt_dir}: starting from scratch")
    if resume_step is not None:
        _check_resumable(orbax_io.restore_metadata(ckpt_dir, resume_step)["config"], config)

    if not primary:  # process 0 builds the data cache first; the others then read it
        distributed.barrier("hpllm data prepared")
    data = data_lib.prepare_data(config)
    if primary:
        distributed.barrier("hpllm data prepared")
    log(data.summary())
    out_dir.mkdir(parents=True, exist_ok=True)
    if primary:
        data.tokenizer.save(out_dir / "tokenizer.json")
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    if mesh is not None:
        log(f"mesh: {mesh_lib.describe(mesh)} over {mesh.size} devices in "
            f"{jax.process_count()} process(es)")

    chip = current_chip()
    peak = chip.peak(tc.compute_dtype)
    flops_per_token = train_flops_per_token(config.model, tc.seq_len)
    tokens_per_step = tc.batch_size * tc.seq_len
    log(f"model: {count_params(config.model) / 1e6:.2f} M parameters "
        f"({count_params(config.model, embedding=False) / 1e6:.2f} M in matmuls), "
        f"{flops_per_token / 1e6:.1f} MFLOP/token trained; "
        f"{chip.name}: peak {peak / 1e12:.3f} TFLOP/s {tc.compute_dtype} per device "
        f"({'measured' if chip.measured else 'datasheet'})")
    if config.model.n_experts:
        m = config.model
        log(f"mixture of experts: {m.experts_per_token} of {m.n_experts} experts per token "
            f"(FLOPs count only those), capacity factor {m.capacity_factor or 'dropless'}, "
            f"aux loss weight {m.router_aux_weight}")
    if config.mesh.stage > 1:
        bubble = bubble_fraction(config.mesh.stage, tc.microbatches, tc.pipeline_schedule)
        log(f"pipeline: {tc.pipeline_schedule}, {config.mesh.stage} stages x "
            f"{tc.microbatches} microbatches, bubble {100 * bubble:.1f}% of stage-steps idle")

    if resume_step is not None:
        state, _ = orbax_io.restore(ckpt_dir, resume_step, _abstract_state(config, mesh))
        log(f"resumed from step {resume_step} ({ckpt_dir})")
    elif mesh is not None:  # created in place, sharded: never whole on one device
        state = init_sharded_state(config, mesh, jax.random.key(tc.seed))
    else:
        state = jax.jit(init_state, static_argnums=0)(config, jax.random.key(tc.seed))
    start = int(state["step"])
    n_devices = len(state["step"].sharding.device_set)  # the devices the step runs on
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", start if resume_step is not None else None,
                             write=primary)

    step_fn, eval_fn = jit_train_step(config, mesh), jit_eval_step(config, mesh)
    eval_batches = data.val.eval_batches(tc.eval_tokens)
    batch_fn, transfer = data.train.batch_at, jax.device_put
    if mesh is not None:  # each process builds only its rows of each batch
        rows = sharding.batch_sharding(mesh)
        batch_fn, transfer = distributed.sharded_batches(data.train, rows), lambda b: b
        sharded_eval = eval_fn
        eval_fn = lambda p, b: sharded_eval(p, distributed.place_batch(b, rows))  # noqa: E731

    def save(step: int) -> None:
        meta = {"config": config.to_dict(),
                "data": {"step": step, "epoch": data.train.epoch_of(step)}}
        orbax_io.save(ckpt_dir, step, state, meta, keep=tc.keep_checkpoints)

    last_loss = float("nan")
    window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0}
    bar = tqdm(total=tc.steps, initial=start, disable=not (tc.progress and primary), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    log_line = (lambda s: bar.write(s)) if tc.progress and primary else log
    prefetcher = data_lib.Prefetcher(batch_fn, start, tc.prefetch, transfer)
    try:
        for step in range(start, tc.steps):
            wait0 = prefetcher.wait_seconds
            batch_step, batch = prefetcher.next()
            assert batch_step == step, (batch_step, step)
            window["wait"] += prefetcher.wait_seconds - wait0
            state, metrics = step_fn(state, batch)
            done = step + 1
            if step == start:  # the first call compiles: keep it out of the throughput figures
                jax.block_until_ready(metrics)
                log_line(f"compiled and ran the first step in {time.perf_counter() - window['t']:.1f} s")
                window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0}
            else:
                window["steps"] += 1
            bar.update(1)
            if done % tc.log_every == 0 or done == tc.steps:
                last_loss = float(metrics["loss"])  # blocks: the window's steps have finished
                if not math.isfinite(last_loss):
                    raise FloatingPointError(f"loss is {last_loss} at step {done}; lower lr?")
                record = {"step": done, "loss": last_loss, "lr": float(metrics["lr"]),
                          "grad_norm": float(metrics["grad_norm"])}
                line = f"step {done:>6}/{tc.steps} | loss {last_loss:.4f}"
                if "aux_loss" in metrics:  # mixture of experts: balance and capacity drops
                    record.update(aux_loss=float(metrics["aux_loss"]),
                                  dropped=int(metrics["dropped"]),
                                  dropped_fraction=float(metrics["dropped_fraction"]),
                                  expert_load=jax.device_get(metrics["expert_load"]).tolist())
                    busiest = max(max(layer) for layer in record["expert_load"])
                    line += (f" | aux {record['aux_loss']:.3f} | dropped {record['dropped']} "
                             f"({100 * record['dropped_fraction']:.1f}%) | busiest expert "
                             f"{busiest * config.model.n_experts:.2f}x its share")
                if window["steps"]:  # throughput since the last line, the compile excluded
                    elapsed = time.perf_counter() - window["t"]
                    tok_s = window["steps"] * tokens_per_step / elapsed
                    tflops = tok_s * flops_per_token / n_devices / 1e12
                    record.update(tokens_per_s=tok_s, tflops_per_device=tflops,
                                  mfu=tflops * 1e12 / peak, data_wait=window["wait"] / elapsed)
                    line += (f" | {tok_s / 1e3:6.2f}k tok/s | {tflops:.3f} TFLOP/s/dev | "
                             f"MFU {100 * record['mfu']:4.1f}% | data wait "
                             f"{100 * record['data_wait']:4.1f}%")
                metrics_log.append(record)
                log_line(line + f" | lr {record['lr']:.2e} | |g| {record['grad_norm']:.2f}")
                window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0}
            if done % tc.eval_every == 0 and done != tc.steps:
                result = evaluate(state["params"], eval_batches, eval_fn)
                metrics_log.append({"step": done, **result})
                log_line(f"step {done:>6} | val loss {result['val_loss']:.4f} | "
                         f"val {result['val_bpb']:.3f} bits/byte")
                window["t"] = time.perf_counter()  # evaluation time is not training time
            if done % tc.ckpt_every == 0 or done == tc.steps:
                save(done)
                window["t"] = time.perf_counter()
            if on_step is not None:
                on_step(done, metrics)
    except KeyboardInterrupt:
        step_now = int(state["step"])
        if step_now > start and orbax_io.latest_step(ckpt_dir) != step_now:
            save(step_now)
            log(f"interrupted: checkpoint saved at step {step_now}; continue with --resume")
        raise
    finally:
        prefetcher.close()
        bar.close()

    final = evaluate(state["params"], data.val.eval_batches(0), eval_fn)
    metrics_log.append({"step": tc.steps, **final, "split": "full validation"})
    if primary:
        metrics_log.plot(out_dir / "loss.png")
    seconds = time.perf_counter() - t_start
    log(f"final: validation loss {final['val_loss']:.4f} nats/token, "
        f"{final['val_bpb']:.3f} bits/byte over {final['val_tokens']} held-out tokens; "
        f"total time {seconds:.0f} s; curve {out_dir / 'loss.png'}, metrics "
        f"{out_dir / 'metrics.jsonl'}")
    if tc.sample_tokens and jax.process_count() > 1:
        log("no sample: generation runs in one process (its params are split over several)")
    elif tc.sample_tokens:
        for label, temperature in (("greedy", 0.0), ("sampled (T=0.8, top-k 50)", 0.8)):
            text = sample_text(state["params"], config, data.tokenizer, tc.sample_prompt,
                               tc.sample_tokens, temperature=temperature, top_k=50, seed=tc.seed)
            log(f"--- {label} ---\n{tc.sample_prompt}{text}")
    return TrainResult(tc.steps, last_loss, final["val_loss"], final["val_bpb"], seconds,
                       metrics_log.records)


def sample_text(params, config: Config, tokenizer, prompt: str, n_tokens: int, **kw) -> str:
    ids = tokenizer.encode(prompt) or [tokenizer.bos_id]
    n_tokens = min(n_tokens, config.model.max_seq_len - len(ids))
    if n_tokens <= 0:
        return ""
    out = list(generate(params, config.model, ids, n_tokens, stop_ids=(tokenizer.eos_id,),
                        dtype=jnp.dtype(config.train.compute_dtype), **kw))
    return tokenizer.decode([t for t in out if t != tokenizer.eos_id])
