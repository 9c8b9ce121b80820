"""Parity with llama.cpp on the same GGUF file: tokenizer ids, next-token logits, greedy text,
and single-stream generation speed, measured in one run.

    python bench/llamacpp_parity.py [--model smollm2-135m] [--positions 256] [--tokens 128]
                                    [--out docs/perf/llamacpp_parity.md]

Needs llama-cpp-python, which is not a dependency of hpllm: build it once from its PyPI source
archive (10-20 min on 2 cores) and keep the wheel:

    pip wheel --no-deps --no-binary llama-cpp-python -w ~/.cache/hpllm/wheels llama-cpp-python
    pip install --no-deps ~/.cache/hpllm/wheels/llama_cpp_python-*.whl diskcache

llama.cpp computes with the file's Q4_1/Q8_0 weights and quantizes activations to 8 bits for
its quantized dot products; hpllm dequantizes the weights to float32 once at load time and
computes in float32. So the logits agree closely but not exactly.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.checkpoints.registry import load_model
from hpllm.infer.generate import generate
from hpllm.model.transformer import forward
from hpllm.train.data import shakespeare_validation_texts

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from report import emit  # noqa: E402

TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "Numbers: 0 7 42 3.14159 1,000,000 2024-06-01 0x1F 1e-9 and 12345678901234567890",
    "Whitespace:  two  spaces,\tTabs\t\there,\n\nblank lines\n\n\n   and trailing   ",
    "Unicode: naïve café résumé — “quotes” ‘single’ … ½ ⅓ ∑ ∫ √2 ≠ ≤ €100 £5 ¥",
    "CJK and others: 日本語のテキスト 中文文本 한국어 텍스트 Ελληνικά русский текст العربية עברית हिन्दी",
    "Emoji: 🦙🔥👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }  // C++ loop\n#include <vector>",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>  {\"json\": [1, 2, {\"k\": null}]}",
    "It's, don't, we'll, they've, I'd, she's, YOU'RE, O'Brien's — contractions",
    "CamelCaseIdentifiers snake_case_names kebab-case-words SCREAMING_SNAKE",
    "Mixed123Digits456and789letters a1b2c3 v2.0.1-rc3",
    "Special-looking text: <|im_start|> <|im_end|> <|endoftext|> <s> </s>",
    "   ",
    "\n",
]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def tokenizer_parity(model, llm, texts):
    same, rows = 0, []
    for text in texts:
        ours = model.tokenizer.encode(text)
        theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
        same += ours == theirs
        if ours != theirs:
            rows.append(f"  MISMATCH {text[:40]!r}: ours {ours[:12]} llama.cpp {theirs[:12]}")
    return same, rows


def logits_parity(model, llm, tokens):
    llm.reset()
    llm.eval(tokens)
    theirs = np.asarray(llm.scores[:len(tokens)], np.float64)
    logits, _ = jax.jit(lambda p, t: forward(p, t, jnp.arange(t.shape[1])[None], model.config))(
        model.params, jnp.asarray([tokens]))
    ours = np.asarray(logits[0], np.float64)
    cos = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    agree = ours.argmax(-1) == theirs.argmax(-1)
    top1 = agree.mean()
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0])[~agree]  # how close llama.cpp's own call was
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    p = np.exp(log_softmax(theirs))
    kl = (p * (log_softmax(theirs) - log_softmax(ours))).sum(-1).mean()
    return {"positions": len(tokens), "top1": top1, "cos_mean": cos.mean(), "cos_min": cos.min(),
            "max_rel": rel, "kl": kl,
            "margin": float(np.median(margins)) if len(margins) else 0.0}


def write_f32_copy(path, out) -> None:
    """The same GGUF with every tensor dequantized to F32 (stored rows, metadata kept): with
    it llama.cpp computes in float32 too, which isolates the effect of quantized arithmetic."""
    import gguf

    from hpllm.checkpoints.gguf import read_gguf, read_tensor

    reader = gguf.GGUFReader(path)  # for the value types of the metadata
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    file = read_gguf(path)
    for name in file.tensors:
        writer.add_tensor(name, read_tensor(file, name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ours_speed(model, prompt_ids, n):
    def run():
        start, first = time.perf_counter(), None
        out = []
        for t in generate(model.params, model.config, prompt_ids, n):  # no stop ids: n tokens
            out.append(t)
            first = first or time.perf_counter()
        return out, first - start, time.perf_counter() - first

    run()  # compile prefill and decode
    out, first, rest = run()
    return out, (len(out) - 1) / rest, first


def llamacpp_speed(llm, prompt_ids, n):
    def run():
        llm.reset()
        start, first, out = time.perf_counter(), None, []
        for t in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            out.append(int(t))
            first = first or time.perf_counter()
            if len(out) == n:
                break
        return out, first - start, time.perf_counter() - first

    run()
    out, first, rest = run()
    return out, (len(out) - 1) / rest, first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--positions", type=int, default=256, help="positions of logits compared")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated for the speed test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="", help="also write the report (markdown) here")
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed; see this script's docstring", file=sys.stderr)
        return 2

    model = load_model(args.model, progress=False)
    llm = llama_cpp.Llama(str(model.path), n_ctx=max(1024, args.positions + args.tokens + 64),
                          n_batch=512, logits_all=True, n_threads=args.threads, verbose=False)
    val = shakespeare_validation_texts()
    chunks = [t[len(t) // 3:len(t) // 3 + 1500] for t in val[:10]]
    lines = [f"# Parity with llama.cpp: {model.path.name}", "",
             f"Command: `python bench/llamacpp_parity.py --positions {args.positions} --tokens "
             f"{args.tokens}`  ",
             f"Machine: {cpu_name()}, {jax.local_device_count()} JAX CPU device(s), llama.cpp "
             f"threads {args.threads}; jax {jax.__version__}, llama-cpp-python "
             f"{llama_cpp.__version__}", "",
             f"hpllm load time (read, dequantize to float32, convert): {model.load_seconds:.2f} s",
             ""]

    same, bad = tokenizer_parity(model, llm, TEXTS)
    same_val, bad_val = tokenizer_parity(model, llm, chunks)
    lines += ["## Tokenizer", "",
              f"- varied texts (unicode, digits, whitespace runs, code, emoji): {same}/{len(TEXTS)} "
              "identical id sequences",
              f"- Shakespeare validation passages of 1500 characters: {same_val}/{len(chunks)} "
              "identical", *bad, *bad_val, ""]

    text = "\n\n".join(val[1:])
    tokens = llm.tokenize(text[len(text) // 2:len(text) // 2 + 8 * args.positions].encode(),
                          add_bos=False, special=False)[:args.positions]
    r = logits_parity(model, llm, tokens)
    lines += ["## Next-token logits", "",
              f"{r['positions']} positions of Shakespeare validation text, one forward each:", "",
              "| top-1 agreement | cosine mean | cosine min | max abs diff / max abs logit | "
              "KL(llama.cpp ‖ hpllm) nats |", "|---|---|---|---|---|",
              f"| {100 * r['top1']:.1f} % | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | "
              f"{r['max_rel']:.4f} | {r['kl']:.5f} |", "",
              f"Where the top-1 tokens differ, llama.cpp's own top two logits are a median "
              f"{r['margin']:.3f} apart (near-ties).", ""]

    tmp = tempfile.TemporaryDirectory()
    f32_path = pathlib.Path(tmp.name) / "f32.gguf"
    write_f32_copy(model.path, f32_path)
    llm32 = llama_cpp.Llama(str(f32_path), n_ctx=1024, n_batch=512, logits_all=True,
                            n_threads=args.threads, verbose=False)
    r32 = logits_parity(model, llm32, tokens)
    lines += ["Control: llama.cpp on an F32 copy of the same file (every tensor dequantized "
              "to float32, nothing else changed), so that it computes in float32 as hpllm does:",
              "", "| top-1 agreement | cosine mean | cosine min | max abs diff / max abs logit | "
              "KL nats |", "|---|---|---|---|---|",
              f"| {100 * r32['top1']:.1f} % | {r32['cos_mean']:.6f} | {r32['cos_min']:.6f} | "
              f"{r32['max_rel']:.5f} | {r32['kl']:.6f} |", ""]

    prompt = model.tokenizer.encode("The capital of France is")
    ours, ours_tps, ours_first = ours_speed(model, prompt, args.tokens)
    rows = [f"| hpllm (JAX, float32 weights, dense KV cache) | {ours_tps:.1f} | {ours_first:.3f} "
            "| |"]
    for label, path in [("llama.cpp, the Q4_1 file", model.path),
                        ("llama.cpp, the F32 copy", f32_path)]:
        # a context without logits for every position, as llama.cpp generates by default
        llm_speed = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=args.threads, verbose=False)
        theirs, tps, first = llamacpp_speed(llm_speed, prompt, args.tokens)
        del llm_speed
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                     min(len(ours), len(theirs)))
        rows.append(f"| {label} | {tps:.1f} | {first:.3f} | {agree}/{args.tokens} |")
        if path == model.path:
            q4_text = model.tokenizer.decode(theirs[:24])
    tmp.cleanup()
    lines += ["## Greedy generation and speed", "",
              f"Prompt \"The capital of France is\", {args.tokens} greedy tokens, batch 1, "
              "after a warm-up run; the last column counts the leading tokens identical to "
              "hpllm's:", "",
              "| | decode tok/s | first token (prefill) s | same greedy tokens |",
              "|---|---|---|---|", *rows, "",
              f"hpllm: {model.tokenizer.decode(ours[:24])!r}  ",
              f"llama.cpp (Q4_1): {q4_text!r}", ""]
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
