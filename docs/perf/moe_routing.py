"""Plot MoE routing over a training run: drop fraction, per-expert load, validation bits/byte.

    python docs/perf/moe_routing.py MOE_RUN [DENSE_RUN] [-o docs/perf/moe_routing.png]

A run is an out_dir or its metrics.jsonl (docs/perf/moe_routing.{moe,dense}.jsonl are the
runs of moe_routing.md). Reads (`hpllm train` writes dropped_fraction, aux_loss and
expert_load, each layer's share of the routing assignments per expert, every log_every steps).
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def records(run: pathlib.Path) -> list[dict]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("moe", type=pathlib.Path)
    ap.add_argument("dense", type=pathlib.Path, nargs="?")
    ap.add_argument("-o", "--out", type=pathlib.Path,
                    default=pathlib.Path(__file__).with_suffix(".png"))
    args = ap.parse_args()
    moe = records(args.moe)
    logged = [r for r in moe if "expert_load" in r]
    steps = np.array([r["step"] for r in logged])
    load = np.array([r["expert_load"] for r in logged])  # (T, L, E) shares
    n_experts = load.shape[-1]

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(steps, [100 * r["dropped_fraction"] for r in logged], label="dropped")
    ax[0].axhline(5, color="gray", ls="--", lw=0.8, label="5 %")
    ax[0].set(xlabel="step", ylabel="assignments over capacity (%)", title="drop fraction")
    twin = ax[0].twinx()
    twin.plot(steps, [r["aux_loss"] for r in logged], color="C1", alpha=0.6, label="aux loss")
    twin.set_ylabel("aux loss (1 = balanced)")
    ax[0].legend(loc="upper right")
    for layer in range(load.shape[1]):
        share = n_experts * load[:, layer]  # 1 = its fair share
        ax[1].fill_between(steps, share.min(-1), share.max(-1), alpha=0.25, color=f"C{layer}")
        ax[1].plot(steps, share.max(-1), color=f"C{layer}", label=f"layer {layer}")
    ax[1].axhline(1, color="gray", lw=0.8)
    ax[1].set(xlabel="step", ylabel="expert load / fair share",
              title="per-expert load: min..max over experts")
    ax[1].legend()
    for run, label in ((args.moe, "MoE"), (args.dense, "dense")):
        if run is None:
            continue
        val = [(r["step"], r["val_bpb"]) for r in records(run) if "val_bpb" in r]
        if val:
            ax[2].plot(*zip(*val), "o-", label=label)
    ax[2].set(xlabel="step", ylabel="bits/byte", title="validation")
    ax[2].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
