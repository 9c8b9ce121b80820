"""Parity with HF transformers (PyTorch, float32) loading the same GGUF file: next-token logits
over real text and a greedy continuation, measured in one run.

    python bench/hf_parity.py [--model smollm2-135m] [--positions 256] [--tokens 64]

Needs torch, transformers, accelerate and gguf, which are not dependencies of hpllm
(a CPU-only torch wheel is enough). transformers dequantizes the GGUF tensors to float32 and
undoes llama.cpp's Q/K row permutation, as hpllm's loader does, so both run the same
float32 weights: the logits should agree to float rounding.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.checkpoints.registry import load_model
from hpllm.infer.generate import generate
from hpllm.model.transformer import forward
from hpllm.train.data import shakespeare_validation_texts

PROMPT = "The capital of France is"


def load_hf(path):
    """The GGUF at `path` as a transformers causal LM in float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval()


def text_tokens(model, n: int) -> list[int]:
    """`n` token ids of Shakespeare validation text (the same passage as llamacpp_parity)."""
    val = shakespeare_validation_texts()
    text = "\n\n".join(val[1:])
    return model.tokenizer.encode(text[len(text) // 2:len(text) // 2 + 8 * n])[:n]


def logits_parity(model, hf, tokens) -> dict:
    import torch

    with torch.no_grad():
        theirs = hf(torch.tensor([tokens])).logits[0].double().numpy()
    logits, _ = jax.jit(lambda p, t: forward(p, t, jnp.arange(t.shape[1])[None], model.config))(
        model.params, jnp.asarray([tokens]))
    ours = np.asarray(logits[0], np.float64)
    scale = np.abs(theirs).max()
    return {"positions": len(tokens), "max_abs": float(np.abs(ours - theirs).max()),
            "scale": float(scale), "max_rel": float(np.abs(ours - theirs).max() / scale),
            "top1": float((ours.argmax(-1) == theirs.argmax(-1)).mean())}


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens from transformers, one forward per token with its KV cache."""
    import torch

    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        ids = []
        for _ in range(n):
            token = int(out.logits[0, -1].argmax())
            ids.append(token)
            out = hf(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return ids


def greedy_parity(model, hf, n: int) -> dict:
    prompt = model.tokenizer.encode(PROMPT)
    ours = list(generate(model.params, model.config, prompt, n))
    theirs = hf_greedy(hf, prompt, n)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours),
                                                                                  len(theirs)))
    return {"tokens": n, "same": same, "ours": ours, "theirs": theirs,
            "text": model.tokenizer.decode(ours)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--positions", type=int, default=256, help="positions of logits compared")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens compared")
    args = ap.parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"needs torch and transformers ({e}); see this script's docstring", file=sys.stderr)
        return 2
    model = load_model(args.model, progress=False)
    start = time.perf_counter()
    hf = load_hf(model.path)
    print(f"{model.path.name}: transformers {transformers.__version__}, torch {torch.__version__}"
          f" (loaded in {time.perf_counter() - start:.1f} s)")
    r = logits_parity(model, hf, text_tokens(model, args.positions))
    print(f"logits, {r['positions']} positions of Shakespeare validation text: max |Δ| "
          f"{r['max_abs']:.3g} = {r['max_rel']:.2e} of the largest logit ({r['scale']:.2f}); "
          f"top-1 {100 * r['top1']:.1f} %")
    g = greedy_parity(model, hf, args.tokens)
    print(f"greedy from {PROMPT!r}: {g['same']}/{g['tokens']} tokens identical; "
          f"{PROMPT + g['text']!r}")
    ok = r["max_rel"] <= 1e-3 and g["same"] == g["tokens"]
    print("PASS" if ok else "FAIL", "(max |Δ| <= 1e-3 of the largest logit, greedy identical)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
