"""Single-stream (batch 1) decode speed of hpllm's jitted decode step with a dense KV cache,
next to the roofline figure and, when installed, llama.cpp and HF transformers measured in
the same run on the same prompt.

    python bench/decode.py [--model smollm2-135m] [--tokens 128] [--naive-tokens 64]
                           [--threads 2] [--out FILE]

The baseline row is the course's first exercise, naive inference: no KV cache, the whole
sequence run through the model again for every new token (padded to power-of-two buckets,
so a few compiled shapes serve every length; the causal mask keeps padding out). A token at
length L costs a prefill of L tokens, 2·P·L FLOPs plus attention over L² pairs, so n tokens
cost ~P·n² where the cached decode costs 2·P·n: the roofline's prefill prediction of each
step, summed, is printed beside the measurement.

Each engine generates `--tokens` greedy tokens from the same prompt ids, once to warm up
(compile) and once timed; a token's time is the wall time of its decode step (one token in,
next-token logits out, the greedy pick made and read back), and tokens/s is 1 / the median.
The prefill is not counted. The roofline is the bytes a decode step must read (float32
weights + the KV cache it attends over) divided by the measured read bandwidth of this
machine (`hpllm.perf.hardware.current_chip()`).

Peers (not dependencies of hpllm): llama-cpp-python (see bench/llamacpp_parity.py), run on the
Q4_1 file and on an F32 copy of it; torch + transformers + accelerate, which load the same
GGUF and dequantize it to float32. A peer that is not installed is reported as such.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from hpllm.checkpoints.registry import load_model
from hpllm.infer.generate import _decode, _prefill
from hpllm.infer.sampling import pow2_bucket
from hpllm.model.kv_cache import DenseKVCache
from hpllm.model.transformer import forward, unstack_layers
from hpllm.perf.hardware import current_chip
from hpllm.perf.roofline import Workload, predict

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from llamacpp_parity import cpu_name, write_f32_copy  # noqa: E402
from report import emit  # noqa: E402

PROMPT = "The capital of France is"


def ours(model, prompt: list[int], n: int):
    """(token ids, per-token seconds, cache length) of hpllm's decode, as generate() runs it."""
    return decode_steps(model.params, model.config, prompt, n)


def decode_steps(params, config, prompt: list[int], n: int, kv_dtype="float32"):
    """(greedy ids, per-step seconds, cache length) of n tokens with generate's jitted steps,
    the second of two runs (the first compiles); bench/quantization.py reuses it."""
    params = unstack_layers(params)
    length = pow2_bucket(len(prompt) + n, 256, config.max_seq_len)

    def run():
        cache = DenseKVCache.create(config, 1, length, kv_dtype)
        padded = prompt + [0] * (pow2_bucket(len(prompt), 16, length) - len(prompt))
        logits, cache = _prefill(params, jnp.asarray([padded], jnp.int32),
                                 jnp.int32(len(prompt)), cache, config, jnp.float32)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        ids, times = [int(token[0])], []
        for position in range(len(prompt), len(prompt) + n - 1):
            start = time.perf_counter()
            logits, cache = _decode(params, token, jnp.int32(position), cache, config,
                                    jnp.float32)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            ids.append(int(token[0]))  # reads the token back: the step is finished
            times.append(time.perf_counter() - start)
        return ids, times

    run()  # compile
    ids, times = run()
    return ids, times, length


@functools.partial(jax.jit, static_argnames=("config",))
def _full_sequence(params, tokens, length, config):
    """Naive inference's step: the whole (padded) sequence through the model, no cache; the
    next-token logits of its last real position."""
    positions = jnp.arange(tokens.shape[1])[None]
    logits, _ = forward(params, tokens, positions, config, logits_at=length[None] - 1)
    return logits


def naive_steps(params, config, prompt: list[int], n: int):
    """(greedy ids, per-token seconds, the padded length of each step) of n tokens with the
    full sequence recomputed for every token; the second of two runs."""
    def run():
        ids, times, lengths = list(prompt), [], []
        for _ in range(n):
            start = time.perf_counter()
            length = pow2_bucket(len(ids), 16, config.max_seq_len)
            tokens = jnp.asarray([ids + [0] * (length - len(ids))], jnp.int32)
            logits = _full_sequence(params, tokens, jnp.int32(len(ids)), config)
            ids.append(int(jnp.argmax(logits[0])))  # read back: the step is finished
            times.append(time.perf_counter() - start)
            lengths.append(length)
        return ids[len(prompt):], times, lengths

    run()  # compile every bucket
    return run()


def naive_prediction(config, lengths: list[int], chip) -> float:
    """Seconds the roofline gives the naive steps: a prefill of each step's padded length."""
    return sum(predict(config, Workload("prefill", 1, seq_len=length), chip,
                       compute_dtype="float32", attention=config.attention).step_s
               for length in lengths)


def llamacpp(path, prompt: list[int], n: int, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, verbose=False)

    def run():
        llm.reset()
        ids, times, last = [], [], time.perf_counter()
        for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            now = time.perf_counter()
            if ids:  # the first token comes out of the prefill
                times.append(now - last)
            ids.append(int(t))
            last = now
            if len(ids) == n:
                break
        return ids, times

    run()
    ids, times = run()
    return ids, times


def transformers_hf(path, prompt: list[int], n: int, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()

    def run():
        with torch.no_grad():
            out = hf(torch.tensor([prompt]), use_cache=True)
            ids, times = [int(out.logits[0, -1].argmax())], []
            for _ in range(n - 1):
                start = time.perf_counter()
                out = hf(torch.tensor([[ids[-1]]]), past_key_values=out.past_key_values,
                         use_cache=True)
                ids.append(int(out.logits[0, -1].argmax()))
                times.append(time.perf_counter() - start)
        return ids, times

    run()
    ids, times = run()
    return ids, times


def same_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens per engine")
    ap.add_argument("--naive-tokens", type=int, default=64,
                    help="tokens for the naive (no KV cache) baseline; 0 skips it")
    ap.add_argument("--threads", type=int, default=2, help="threads for llama.cpp and torch")
    ap.add_argument("--out", default="", help="also write the report (markdown) here")
    args = ap.parse_args(argv)

    model = load_model(args.model, progress=False)
    prompt = model.tokenizer.encode(PROMPT)
    chip = current_chip()
    ids, times, context = ours(model, prompt, args.tokens)
    step = statistics.median(times)
    pred = predict(model.config, Workload("decode", 1, context=context), chip,
                   compute_dtype="float32")
    rows = [("hpllm (JAX, float32, dense KV cache)", step, ids, len(times), "")]
    naive_lines = []
    if args.naive_tokens:
        n = args.naive_tokens
        naive_ids, naive_times, lengths = naive_steps(model.params, model.config, prompt, n)
        rows.insert(0, ("naive: full sequence per token, no KV cache (baseline)",
                        statistics.median(naive_times), naive_ids, n, ""))
        naive_pred = naive_prediction(model.config, lengths, chip)
        cached_pred = sum(predict(model.config, Workload("decode", 1, context=context), chip,
                                  compute_dtype="float32").step_s for _ in range(n - 1))
        naive_lines = [
            "## Naive inference (no KV cache): the quadratic baseline", "",
            f"- {n} tokens after a {len(prompt)}-token prompt, each step a prefill of the "
            f"whole sequence padded to {sorted(set(lengths))} tokens: 2·P·L FLOPs per step "
            "(plus attention over L² pairs), ~P·n² in all against 2·P·n with a cache",
            f"- predicted (roofline, each step a prefill of its padded length): "
            f"{naive_pred:.2f} s in all, {naive_pred / n * 1e3:.1f} ms/token",
            f"- measured: {sum(naive_times):.2f} s in all, median "
            f"{statistics.median(naive_times) * 1e3:.1f} ms/token "
            f"({(sum(naive_times) - naive_pred) / naive_pred:+.0%} against the prediction)",
            f"- the cached decode of as many tokens: {sum(times[:n - 1]):.2f} s measured, "
            f"{cached_pred:.2f} s predicted: the cache saves "
            f"{sum(naive_times) / max(sum(times[:n - 1]), 1e-9):.1f}x here", ""]

    versions = [f"jax {jax.__version__}"]
    try:
        import llama_cpp
        versions.append(f"llama-cpp-python {llama_cpp.__version__}")
        tmp = tempfile.TemporaryDirectory()
        f32 = pathlib.Path(tmp.name) / "f32.gguf"
        write_f32_copy(model.path, f32)
        for label, path in [("llama.cpp, the Q4_1 file", model.path),
                            ("llama.cpp, an F32 copy of it", f32)]:
            theirs, t = llamacpp(path, prompt, args.tokens, args.threads)
            rows.append((label, statistics.median(t), theirs, len(t), ""))
        tmp.cleanup()
    except ImportError:
        rows.append(("llama.cpp (llama-cpp-python)", None, None, 0, "not installed"))
    try:
        import torch
        import transformers
        versions.append(f"torch {torch.__version__}, transformers {transformers.__version__}")
        theirs, t = transformers_hf(model.path, prompt, args.tokens, args.threads)
        rows.append(("HF transformers (PyTorch, float32, same GGUF)", statistics.median(t),
                     theirs, len(t), ""))
    except ImportError as e:
        rows.append(("HF transformers (PyTorch)", None, None, 0, f"not installed ({e.name})"))

    weights = pred.bytes - next(t.bytes for t in pred.terms if t.name.startswith("attention"))
    kv = 2 * model.config.n_layers * context * model.config.n_kv_heads \
        * model.config.head_dim * 4
    table = ["| engine | decode tok/s | median ms/token | vs hpllm | same greedy tokens as "
             "hpllm |", "|---|---|---|---|---|"]
    for label, s, theirs, count, note in rows:
        if s is None:
            table.append(f"| {label} | {note} | | | |")
            continue
        table.append(f"| {label} | {1 / s:.1f} | {s * 1e3:.2f} | {step / s:.2f}x | "
                     f"{same_prefix(ids, theirs)}/{len(ids)} |")
    lines = [f"# Single-stream decode speed: {model.path.name}", "",
             f"Command: `python bench/decode.py --tokens {args.tokens} --naive-tokens "
             f"{args.naive_tokens} --threads {args.threads}`"
             "  ",
             f"Machine: {cpu_name()}, {jax.local_device_count()} JAX {jax.default_backend()} "
             f"device(s); threads for llama.cpp and torch: {args.threads}; "
             + "; ".join(versions), "",
             f"Prompt {PROMPT!r} ({len(prompt)} tokens), {args.tokens} greedy tokens, batch 1; "
             f"median over {len(times)} decode steps of the second (warm) run, prefill "
             "excluded.", "",
             *table, "",
             "## Roofline (hpllm's float32 decode step)", "",
             f"- bytes read per token: {pred.bytes / 1e6:.0f} MB (float32 weights and "
             f"activations {weights / 1e6:.0f} MB, KV cache of {context} slots "
             f"{kv / 1e6:.1f} MB plus scores)",
             f"- read bandwidth ({chip.name}; {chip.source}): {chip.hbm_bandwidth / 1e9:.1f} GB/s",
             *[f"- {note}" for note in pred.notes],
             f"- roofline: {pred.step_s * 1e3:.2f} ms/token = {1 / pred.step_s:.1f} tok/s "
             f"({pred.bound}-bound)",
             f"- measured: {step * 1e3:.2f} ms/token = {1 / step:.1f} tok/s, "
             f"{pred.step_s / step:.0%} of the roofline; effective "
             f"{pred.bytes / step / 1e9:.1f} GB/s", "", *naive_lines]
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
