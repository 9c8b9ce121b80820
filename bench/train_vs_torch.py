"""hpllm's training step against PyTorch's on the same model, optimizer and batch, interleaved.

    python bench/train_vs_torch.py [--preset shakespeare] [--rounds 3] [--steps 5]
                                   [--peers eager,compile] [--torch PYTHON] [--json out.json]
    python bench/train_vs_torch.py --kernels     # the bf16 matmul kernel vs XLA's dots

The PyTorch peer is a nanoGPT-style model of the preset's shape (RMSNorm, RoPE, grouped-query
`F.scaled_dot_product_attention`, SwiGLU, tied output), AdamW with the preset's settings and
gradient clipping, bf16 autocast, float32 weights, 2 threads, in eager mode and under
`torch.compile`. It runs in its own virtual environment (never a dependency of hpllm;
default ~/.cache/hpllm/peers/torch-venv, see docs/perf/train_cpu.md for how it was made) as a
subprocess of this script that times steps when asked: each round runs `--steps` steps of
hpllm, then of each peer, so a busy machine slows them alike. Prints tokens/s and step ms of
each (median over rounds), the ratio to hpllm and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

TORCH_PYTHON = pathlib.Path.home() / ".cache" / "hpllm" / "peers" / "torch-venv" / "bin" / "python"


# ------------------------------------------------------------------------ the torch peer
# Runs in the torch venv: imports torch only (no jax, no hpllm).

def peer_main(spec: dict, mode: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    D, H, KV, F_, V, L = (spec[k] for k in ("dim", "n_heads", "n_kv_heads", "hidden_dim",
                                              "vocab_size", "n_layers"))
    hd, eps = D // H, spec["norm_eps"]

    def rope(x, cos, sin):  # x (B, h, S, hd), rotate-half layout
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.RMSNorm(D, eps=eps), nn.RMSNorm(D, eps=eps)
            self.wq = nn.Linear(D, H * hd, bias=False)
            self.wkv = nn.Linear(D, 2 * KV * hd, bias=False)
            self.wo = nn.Linear(H * hd, D, bias=False)
            self.w_gate_up = nn.Linear(D, 2 * F_, bias=False)
            self.w_down = nn.Linear(F_, D, bias=False)

        def forward(self, x, cos, sin):
            B, S, _ = x.shape
            h = self.n1(x)
            q = self.wq(h).view(B, S, H, hd).transpose(1, 2)
            k, v = self.wkv(h).view(B, S, 2, KV, hd).permute(2, 0, 3, 1, 4)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.wo(a.transpose(1, 2).reshape(B, S, D))
            g, u = self.w_gate_up(self.n2(x)).chunk(2, dim=-1)
            return x + self.w_down(F.silu(g) * u)

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, D)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.norm = nn.RMSNorm(D, eps=eps)
            for p in self.parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, std=spec["init_std"])

        def forward(self, tokens, targets):
            S = tokens.shape[1]
            inv = spec["rope_theta"] ** (-torch.arange(0, hd, 2).float() / hd)
            ang = torch.arange(S).float()[:, None] * inv
            ang = torch.cat([ang, ang], dim=-1)
            cos, sin = ang.cos(), ang.sin()
            x = self.embed(tokens)
            for b in self.blocks:
                x = b(x, cos, sin)
            logits = self.norm(x) @ self.embed.weight.T
            return F.cross_entropy(logits.float().view(-1, V), targets.view(-1))

    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(spec["beta1"], spec["beta2"]),
                            weight_decay=spec["weight_decay"])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (spec["batch_size"], spec["seq_len"] + 1), generator=g)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if mode == "compile":
        step = torch.compile(step)
    t0 = time.perf_counter()
    for _ in range(2):
        step()
    print(json.dumps({"ready": True, "warmup_s": time.perf_counter() - t0,
                      "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            loss = step().detach()
            float(loss)
            times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times, "loss": float(loss)}), flush=True)


class Peer:
    """A torch peer subprocess: started, warmed up, then asked for `steps` timed steps."""

    def __init__(self, python: str, spec: dict, mode: str):
        self.mode = mode
        self.proc = subprocess.Popen([python, __file__, "--peer", mode, "--spec", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self._line())
        self.times: list[float] = []

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torch peer ({self.mode}) exited with {self.proc.wait()}")
        return line

    def run(self, steps: int) -> None:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        self.times += json.loads(self._line())["times"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ------------------------------------------------------------------------------- hpllm side

def kernel_table(rounds: int = 5) -> None:
    """GFLOP/s of the bf16 kernel, XLA's bf16 dot and XLA's float32 dot on the default
    preset's training shapes (forward and both gradients of each projection)."""
    import jax
    import jax.numpy as jnp

    from hpllm.kernels import cpu_matmul as cm

    shapes = [  # (M, K, N, trans_a, trans_b, what)
        (4096, 256, 512, 0, 0, "qkv fwd"), (4096, 256, 1408, 0, 0, "gate+up fwd"),
        (4096, 704, 256, 0, 0, "down fwd"), (4096, 256, 2048, 0, 1, "head fwd (tied)"),
        (4096, 704, 256, 0, 1, "gate dx"), (4096, 256, 704, 0, 1, "down dx"),
        (256, 4096, 704, 1, 0, "gate dW"), (704, 4096, 256, 1, 0, "down dW"),
        (2048, 4096, 256, 1, 0, "head dW")]
    cases = []
    for m, k, n, ta, tb, what in shapes:
        a = jnp.ones((k, m) if ta else (m, k), jnp.bfloat16) * 0.5
        b = jnp.ones((n, k) if tb else (k, n), jnp.bfloat16) * 0.25
        kw = {"trans_a": bool(ta), "trans_b": bool(tb)}
        fns = {"kernel": (jax.jit(lambda a, b, kw=kw: cm.matmul(a, b, **kw)), a, b),
               "xla bf16": (jax.jit(lambda a, b, kw=kw: cm.reference(a, b, **kw)), a, b),
               "xla f32": (jax.jit(lambda a, b, kw=kw: cm.reference(
                   a, b, out_dtype=jnp.float32, **kw)), a.astype(jnp.float32),
                   b.astype(jnp.float32))}
        for f, x, y in fns.values():
            f(x, y).block_until_ready()
        cases.append((f"{m}x{k}x{n}{' A^T' if ta else ''}{' B^T' if tb else ''} {what}",
                      2 * m * n * k, fns, {name: [] for name in fns}, {name: [] for name in fns}))
    loads = []
    for _ in range(rounds):  # interleaved: each round times every case once
        loads.append(os.getloadavg()[0])
        for _, _, fns, wall, cpu in cases:
            for name, (f, x, y) in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                f(x, y).block_until_ready()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    # per CPU-second (all threads): what the code does with the cycles it got, which a busy
    # machine distorts less than the wall clock
    for index, unit in ((3, "GFLOP/s"), (4, "GFLOP per CPU-second")):
        print(f"{'shape (M x K x N)':<34}" + "".join(f"{n:>12}" for n in cases[0][2])
              + f"   {unit}, best of rounds")
        for case in cases:
            print(f"{case[0]:<34}" + "".join(f"{case[1] / max(min(t), 1e-9) / 1e9:>12.0f}"
                                             for t in case[index].values()))
    print(f"load average during the run: {sum(loads) / len(loads):.1f}")


def model_spec(config) -> dict:
    m, t = config.model, config.train
    return {"dim": m.dim, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
            "hidden_dim": m.hidden_dim, "vocab_size": m.vocab_size, "n_layers": m.n_layers,
            "norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "init_std": m.init_std,
            "batch_size": t.batch_size, "seq_len": t.seq_len, "lr": t.lr, "beta1": t.beta1,
            "beta2": t.beta2, "weight_decay": t.weight_decay, "grad_clip": t.grad_clip,
            "threads": os.cpu_count() or 2}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    parser.add_argument("--peers", default="eager,compile")
    parser.add_argument("--torch", default=str(TORCH_PYTHON), help="the peer's python")
    parser.add_argument("--kernels", action="store_true", help="the matmul kernel table only")
    parser.add_argument("--json", default="")
    parser.add_argument("--peer", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        return peer_main(json.loads(args.spec), args.peer)
    if args.kernels:
        return kernel_table()

    import numpy as np

    from hpllm.config import make_config
    from hpllm.model.transformer import count_params

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from train_step import prepare, run_steps

    config = make_config(args.preset, ["--compute_dtype=bfloat16"])
    if config.model.n_experts or config.model.pos_embedding != "rope" or \
            config.model.attention_window:
        raise SystemExit("the torch peer models dense RoPE models with full causal attention")
    tokens = config.train.batch_size * config.train.seq_len
    print(f"preset {args.preset}: {count_params(config.model) / 1e6:.2f} M parameters, batch "
          f"{config.train.batch_size} x {config.train.seq_len}, AdamW, bf16 compute")
    sides = {"hpllm": prepare(config, True)}
    peers = {f"torch {m}": Peer(args.torch, model_spec(config), m)
             for m in args.peers.split(",") if m}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        run_steps(sides["hpllm"], args.steps)
        for peer in peers.values():
            peer.run(args.steps)
    for peer in peers.values():
        peer.close()
    times = {"hpllm": sides["hpllm"]["times"], **{k: p.times for k, p in peers.items()}}
    version = next(iter(peers.values())).info["torch"] if peers else "-"
    hp = float(np.median(times["hpllm"]))
    print(f"torch {version}; load average {np.mean(loads):.1f} "
          f"(1-min, at the start of each round)")
    print(f"{'':<16}{'tok/s':>10}{'step ms':>10}{'min ms':>9}{'hpllm x':>9}")
    rows = []
    for name, t in times.items():
        med = float(np.median(t))
        rows.append({"side": name, "tokens_per_s": tokens / med, "step_ms": 1e3 * med,
                     "step_ms_min": 1e3 * min(t), "hpllm_speedup": med / hp})
        print(f"{name:<16}{tokens / med:>10.0f}{1e3 * med:>10.1f}{1e3 * min(t):>9.1f}"
              f"{med / hp:>8.2f}x")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"preset": args.preset, "torch": version, "load_average": float(np.mean(loads)),
             "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
