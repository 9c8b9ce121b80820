"""Text embeddings from the decoder: the final hidden state, after the final RMSNorm (the
vector the output projection reads), mean-pooled over the input's tokens and L2-normalised.

Inputs run in batches padded on the right to a few shapes: the length to a power of two
(at least 16, at most the limit), the rows to a power of two within a token budget. The
attention is causal, so a token never sees the padding after it, and the mean counts only
the input's own tokens: an input's embedding does not depend on what it was batched with,
up to float rounding.

    embedder = Embedder(params, config, max_len=2048)
    vectors = embedder([[1, 2, 3], [4, 5]])      # (2, dim) float32, unit rows
    vectors = await embedder.embed_async(ids)    # the same, on its own worker thread

The async form runs the passes on one worker thread: the caller's event loop stays free and
the engine's own thread keeps stepping (JAX dispatch is thread-safe; the parameters are only
read, never donated).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import ModelConfig
from hpllm.infer.sampling import pow2_bucket
from hpllm.model.layers import rms_norm
from hpllm.model.transformer import decoder_stack, embed

MIN_LENGTH_BUCKET = 16


class EmbeddingError(ValueError):
    """An input that cannot be embedded (empty, too long, a token id outside the vocabulary);
    `index` is its place in the batch."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def pooled_embeddings(params, tokens, lengths, config: ModelConfig, dtype=jnp.float32):
    """tokens (B, S) int, right-padded; lengths (B,) int: each row's real tokens. Returns
    (B, D) float32: the mean over the first `length` positions of the final-normed hidden
    state, L2-normalised (a row of length 0 gives zeros)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = embed(params, tokens, positions, config, dtype)
    x, _, _ = decoder_stack(params["layers"], x, positions, config)
    h = rms_norm(x, params["final_norm"], config.norm_eps).astype(jnp.float32)
    real = (positions < lengths[:, None])[..., None]
    mean = jnp.where(real, h, 0.0).sum(axis=1) / jnp.maximum(lengths, 1)[:, None]
    norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
    return mean / jnp.maximum(norm, 1e-12)


class Embedder:
    """Embeds lists of token ids with `pooled_embeddings`, in padded batches."""

    def __init__(self, params, config: ModelConfig, max_len: int, dtype=jnp.float32,
                 max_batch_tokens: int = 8192):
        """max_len: the longest input accepted (at most config.max_seq_len);
        max_batch_tokens: padded tokens per pass (bounds the activations' memory)."""
        self.params, self.config, self.dtype = params, config, dtype
        self.max_len = min(max_len, config.max_seq_len)
        self.max_batch_tokens = max(max_batch_tokens, self.max_len)
        self.dim = config.dim
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "hpllm-embed")

    def check(self, inputs: list[list[int]]) -> None:
        """Raises EmbeddingError for the first input that cannot be embedded."""
        for i, ids in enumerate(inputs):
            if not ids:
                raise EmbeddingError(f"input {i} is empty", i)
            if len(ids) > self.max_len:
                raise EmbeddingError(f"input {i} has {len(ids)} tokens; at most "
                                     f"{self.max_len} can be embedded", i)
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise EmbeddingError(f"input {i}: token id {bad[0]} is not in "
                                     f"[0, {self.config.vocab_size})", i)

    def length_bucket(self, n: int) -> int:
        return pow2_bucket(n, MIN_LENGTH_BUCKET, self.max_len)

    def batches(self, lengths: list[int]) -> list[tuple[int, list[int]]]:
        """(padded length, input indices) per pass: inputs sorted by length, so each pass
        pads little, and as many rows per pass as the token budget allows."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        passes, start = [], 0
        while start < len(order):
            # the pass's length is its longest input's bucket; grow while rows fit the budget
            end = start + 1
            while end < len(order):
                width = self.length_bucket(lengths[order[end]])
                if pow2_bucket(end + 1 - start) * width > self.max_batch_tokens:
                    break
                end += 1
            passes.append((self.length_bucket(lengths[order[end - 1]]), order[start:end]))
            start = end
        return passes

    def __call__(self, inputs: list[list[int]]) -> np.ndarray:
        """(len(inputs), dim) float32, unit rows, in the order given."""
        self.check(inputs)
        out = np.zeros((len(inputs), self.dim), np.float32)
        for width, rows in self.batches([len(ids) for ids in inputs]):
            tokens = np.zeros((pow2_bucket(len(rows)), width), np.int32)
            lengths = np.zeros(tokens.shape[0], np.int32)
            for r, i in enumerate(rows):
                tokens[r, :len(inputs[i])] = inputs[i]
                lengths[r] = len(inputs[i])
            vectors = pooled_embeddings(self.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                        self.config, self.dtype)
            out[rows] = np.asarray(vectors)[:len(rows)]
        return out

    async def embed_async(self, inputs: list[list[int]]) -> np.ndarray:
        """The same as calling it, on the embedder's worker thread (one pass at a time)."""
        return await asyncio.wrap_future(self._worker.submit(self, inputs))
