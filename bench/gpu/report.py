"""The acceptance report: WORK/results.jsonl and WORK/steps.tsv (written by
bench/gpu/acceptance.sh and the steps of acceptance.py) -> OUT/<date>-<chip>.md and .json.

    python bench/gpu/report.py --work DIR --out DIR --command "bench/gpu/acceptance.sh ..."

Standard library only, so the report is written even when hpllm or JAX fails to import.
Exit status 0 when every step exited 0 and no case failed or raised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

STEPS = ("env", "kernels", "attention", "train", "decode")


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def load(work: pathlib.Path) -> tuple[list[dict], dict]:
    """(result rows, {step: {rc, seconds, budget_s}}) from a work folder."""
    results, tsv = work / "results.jsonl", work / "steps.tsv"
    rows = [json.loads(line) for line in results.read_text().splitlines()
            if line.strip()] if results.exists() else []
    steps = {}
    for line in tsv.read_text().splitlines() if tsv.exists() else []:
        name, rc, seconds, budget = line.split()
        steps[name] = {"rc": int(rc), "seconds": int(seconds), "budget_s": int(budget)}
    return rows, steps


def passed(rows: list[dict], steps: dict) -> bool:
    return (bool(rows) and all(name in steps and steps[name]["rc"] == 0 for name in STEPS)
            and not any(r.get("ok") is False or "error" in r for r in rows))


def _table(title: str, columns: list[str], cells: list[list]) -> list[str]:
    """A markdown section: a title and a table, one list of cells per row, padded."""
    return [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(map(str, row + [""] * (len(columns) - len(row)))) + " |"
        for row in cells]


def _of(rows, kind):
    return [r for r in rows if r["kind"] == kind]


def _kernel_lines(rows):
    keys = ("batch", "length", "context", "contexts", "queries", "heads", "kv_heads",
            "head_dim", "window", "segments", "splits", "block_size", "case")
    return _table("## 1. Kernels against their float32 references (relative L2 error)",
                  ["kernel", "dtype", "shape", "rel err", "tolerance", "ok"],
                  [[r["kernel"], r.get("dtype", ""),
                    ", ".join(f"{k}={r[k]}" for k in keys if r.get(k) is not None),
                    _fmt(r.get("rel_err")), _fmt(r.get("tolerance")),
                    r.get("error") or ("yes" if r.get("ok") else "NO")]
                   for r in _of(rows, "kernel")])


def _attention_lines(rows):
    def cells(r):
        head = [r.get("impl"), r.get("pass_", "-"), f"{r.get('batch', '-')} x "
                f"{r.get('length', '-')}", f"{r.get('heads', '-')} x {r.get('head_dim', '-')}"]
        what = r.get("error") or r.get("skipped")
        return head + ([what] if what else [
            f"{r['seconds'] * 1e3:.3g}", f"{r['tflops']:.3g}",
            f"{100 * r['fraction_of_peak']:.1f}%"])

    return _table("## 2. Causal attention, bf16 (FLOPs of the causal triangle; fwd+bwd = "
                  "3.5x fwd)", ["impl", "pass", "batch x seq", "heads x dim", "ms", "TFLOP/s",
                                "% of peak"], [cells(r) for r in _of(rows, "attention")])


def _train_lines(rows):
    def cells(r):
        return [r["attention"]] + ([r["error"]] if "error" in r else [
            f"{r['params'] / 1e9:.3g} B", f"{r['batch']} x {r['seq_len']}",
            f"{r['tokens_per_s']:.0f}", f"{r['tflops']:.3g}", f"{100 * r['mfu']:.1f}%",
            f"{r['step_s'] * 1e3:.1f}", f"{r['predicted_step_s'] * 1e3:.1f}",
            f"{r['compile_s']:.1f}", f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"])

    return _table("## 3. Training step (bf16 compute, float32 masters, full remat)",
                  ["attention", "params", "batch x seq", "tok/s", "TFLOP/s", "MFU", "step ms",
                   "roofline ms", "compile s", "loss first -> last"],
                  [cells(r) for r in _of(rows, "train")])


def _decode_lines(rows):
    def cells(r):
        return [r["weights"]] + ([r["error"]] if "error" in r else [
            f"{r['tokens_per_s']:.1f}", f"{r['step_s'] * 1e3:.2f}", f"{r['achieved_gbs']:.4g}",
            f"{100 * r['mbu']:.1f}%", f"{r['roofline_bf16_step_s'] * 1e3:.2f}"])

    lines = _table("## 4. Decode, batch 1, random weights (bytes per token = weights + dense "
                   "KV cache)", ["weights", "tok/s", "ms/token", "GB/s", "MBU",
                                 "bf16 roofline ms/token"],
                   [cells(r) for r in _of(rows, "decode")])
    for r in _of(rows, "engine"):
        lines += ["", f"Paged engine, {r.get('concurrent')} concurrent sequences: " + (
            r["error"] if "error" in r else
            f"{r['prompt_tokens']} prompt + {r['output_tokens']} output tokens each, bf16 "
            f"weights and KV: {r['output_tokens_per_s']:.0f} output tok/s, "
            f"{r['total_tokens_per_s']:.0f} prompt+output tok/s ({r['seconds']:.1f} s; the "
            f"first run, with its compiles, {r['first_run_s']:.1f} s)")]
    return lines


def _target_lines(rows):
    """The figures against issue 22's targets (MaxText, FlashAttention-3, gpt-fast anchors)."""
    lines = [f"- training MFU {100 * r['mfu']:.1f}% with {r['attention']} attention (target "
             f">= 50%)" for r in _of(rows, "train") if "mfu" in r]
    fwd = {(r["impl"], r["length"]): r for r in _of(rows, "attention")
           if r.get("pass_") == "fwd" and "tflops" in r}
    for (impl, length), r in sorted(fwd.items(), key=lambda kv: kv[0][1]):
        if impl == "hpllm pallas":
            cudnn = fwd.get(("cudnn", length))
            lines.append(f"- attention forward at {length} tokens: "
                         f"{100 * r['fraction_of_peak']:.1f}% of peak (target >= 60%)" + (
                             f", {r['tflops'] / cudnn['tflops']:.2f}x cuDNN (target >= 1)"
                             if cudnn else ", no cuDNN figure"))
    lines += [f"- decode MBU, {r['weights']} weights: {100 * r['mbu']:.1f}% (target >= 80%)"
              for r in _of(rows, "decode") if "mbu" in r]
    return ["## Against the targets", ""] + lines if lines else []


def _warning_lines(rows):
    found = _of(rows, "warnings")
    if not found:
        return []
    return ["## Warnings raised during the steps", ""] + [
        f"- {r['step']} ({r['count']}x in all): {m}" for r in found for m in r["messages"]]


def write(work: pathlib.Path, out: pathlib.Path, command: str) -> tuple[pathlib.Path, bool]:
    """Writes the report under `out`; returns the markdown path and whether all passed."""
    rows, steps = load(work)
    ok = passed(rows, steps)
    env = next((r for r in rows if r["kind"] == "env"), {})
    chip = env.get("device_kind") or env.get("chip") or "unknown"
    slug = "".join(c if c.isalnum() else "-" for c in chip.lower()).strip("-")
    slug = f"dryrun-{slug}" if env.get("dry_run") else slug
    date = datetime.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{date}-{slug}.md"
    md.with_suffix(".json").write_text(json.dumps(
        {"command": command, "date": date, "passed": ok, "steps": steps, "rows": rows},
        indent=1))
    lines = [f"# GPU acceptance: {chip}, {date}", "", f"Command: `{command}`  ",
             f"Versions: python {env.get('python')}, jax {env.get('jax')}, jaxlib "
             f"{env.get('jaxlib')}, backend {env.get('backend')}, Pallas target "
             f"{env.get('pallas_target')}, hpllm {env.get('hpllm_commit') or '?'}  ",
             f"nvidia-smi: {env.get('nvidia_smi') or '-'}  ",
             f"Peaks used ({env.get('chip')}; {env.get('chip_source')}): bf16 "
             f"{_fmt((env.get('peak_bf16') or 0) / 1e12, '.0f')} TFLOP/s, memory "
             f"{_fmt((env.get('hbm_bandwidth') or 0) / 1e9, '.0f')} GB/s", "",
             f"**Result: {'every step finished and every check passed' if ok else 'NOT all passed'}"
             "**" + (" (a dry run on CPU at toy sizes: its figures say nothing about a GPU)"
                     if env.get("dry_run") else ""), ""]
    lines += _table("## Steps", ["step", "exit", "seconds", "budget s"], [
        [name, f"{s['rc']}{' (timed out)' if s['rc'] in (124, 137) else ''}", s["seconds"],
         s["budget_s"]] if s else [name, "not run"]
        for name, s in ((name, steps.get(name)) for name in STEPS)])
    for section in (_target_lines, _kernel_lines, _attention_lines, _train_lines,
                    _decode_lines, _warning_lines):
        text = section(rows)
        lines += [""] + text if text else []
    md.write_text("\n".join(lines) + "\n")
    return md, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder of results.jsonl and steps.tsv")
    ap.add_argument("--out", default="docs/perf/gpu", help="where the .md and .json go")
    ap.add_argument("--command", default="bench/gpu/acceptance.sh", help="as it was run")
    args = ap.parse_args(argv)
    md, ok = write(pathlib.Path(args.work), pathlib.Path(args.out), args.command)
    print(md.read_text())
    print(f"report: {md} and {md.with_suffix('.json')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
