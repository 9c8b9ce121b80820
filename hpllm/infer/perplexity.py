"""Perplexity and bits per byte of a pretrained model on text (the CLI's default: the
held-out Shakespeare/Milton works of the training data split,
`hpllm.train.data.shakespeare_validation_texts`).

Each document is cut into windows of `window` predicted tokens; window i reads tokens
[iW, iW + W) and predicts [iW + 1, iW + W], so every token but a document's first is predicted
once, with between 0 and W - 1 tokens of context (like llama.cpp's perplexity, whose chunks
also restart the context). Bits per byte divides the summed negative log-likelihood in bits by
the UTF-8 bytes of the predicted tokens, so it compares across tokenizers (and with the
README's training figures).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.model.transformer import forward


def token_windows(token_lists: list[list[int]], window: int, max_tokens: int = 0):
    """(N, window + 1) int32 windows and their (N, window) target mask, at most max_tokens
    targets in all (0: no limit)."""
    rows, masks, total = [], [], 0
    for tokens in token_lists:
        for start in range(0, max(len(tokens) - 1, 0), window):
            piece = tokens[start:start + window + 1]
            n = len(piece) - 1
            if max_tokens:
                n = min(n, max_tokens - total)
            rows.append(piece + [0] * (window + 1 - len(piece)))
            masks.append([1] * n + [0] * (window - n))
            total += n
            if max_tokens and total >= max_tokens:
                return np.asarray(rows, np.int32), np.asarray(masks, bool)
    return np.asarray(rows, np.int32).reshape(-1, window + 1), np.asarray(masks, bool).reshape(-1, window)


@functools.partial(jax.jit, static_argnames=("config",))
def _window_nll(params, window, config):
    """Negative log-likelihood (nats) of each target of one (1, W + 1) window."""
    inputs, targets = window[:, :-1], window[:, 1:]
    positions = jnp.arange(inputs.shape[1])[None]
    logits, _ = forward(params, inputs, positions, config)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[0, :, 0]


def evaluate_texts(model, texts: list[str], max_tokens: int = 0, window: int = 512,
                   progress: bool = True) -> dict:
    """Perplexity and bits per byte of `model` (a PretrainedModel) over `texts`."""
    from tqdm import tqdm

    window = min(window, model.config.max_seq_len)
    tok = model.tokenizer
    token_lists, have = [], 0
    for text in texts:  # tokenize only as much text as the limit needs
        token_lists.append(tok.encode(text))
        have += len(token_lists[-1]) - 1
        if max_tokens and have >= max_tokens:
            break
    rows, masks = token_windows(token_lists, window, max_tokens)
    if not masks.any():
        raise ValueError("no tokens to evaluate")
    token_bytes = np.asarray([len(b) for b in tok.token_bytes], np.int64)
    nll, n_bytes, start = 0.0, 0, time.perf_counter()
    for row, mask in tqdm(list(zip(rows, masks)), desc="eval-ppl", unit="window",
                          disable=not progress, leave=False):
        per_token = np.asarray(_window_nll(model.params, jnp.asarray(row[None]), model.config))
        nll += float(per_token[mask].sum())
        n_bytes += int(token_bytes[row[1:][mask]].sum())
    n = int(masks.sum())
    seconds = time.perf_counter() - start
    return {"tokens": n, "bytes": n_bytes, "nll_per_token": nll / n,
            "perplexity": math.exp(nll / n), "bits_per_byte": nll / math.log(2) / n_bytes,
            "window": window, "seconds": seconds, "tokens_per_second": n / seconds}
