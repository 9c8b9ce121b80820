"""Log-probabilities of a prompt's own tokens, as OpenAI's completions return them for `echo`
with `logprobs` (and lm-evaluation-harness reads them to score choices): one jitted forward
over the prompt, each token scored by the logits at the position before it; the first token
has no score. Logprobs are the model's own log-softmax (no temperature or penalties), like
the engine's.

    scorer = PromptScorer(params, config, max_len=2048)
    entries = scorer([1, 2, 3], top=2)
    # [{"token_id": 1, "logprob": None, "top": None},
    #  {"token_id": 2, "logprob": -3.1, "top": [(17, -1.2), (2, -3.1)]}, ...]

Prompts are padded on the right to a power of two (at least 16): attention is causal, so the
padding changes no score. `score_async` runs on the scorer's own worker thread.
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
from hpllm.model.transformer import forward

MIN_LENGTH_BUCKET = 16


@functools.partial(jax.jit, static_argnames=("config", "dtype", "top"))
def token_logprobs(params, tokens, config: ModelConfig, dtype=jnp.float32, top: int = 0):
    """tokens (S,) int. Returns the logprob of tokens[j + 1] after tokens[:j + 1] (S - 1,),
    and the `top` most likely tokens there: logprobs and ids, (S - 1, max(top, 1))."""
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)[None]
    logits, _ = forward(params, tokens[None], positions, config, dtype=dtype)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[1:, None], axis=-1)[:, 0]
    top_logp, top_ids = jax.lax.top_k(logp, max(top, 1))
    return chosen, top_logp, top_ids


class PromptScorer:
    def __init__(self, params, config: ModelConfig, max_len: int, dtype=jnp.float32):
        self.params, self.config, self.dtype = params, config, dtype
        self.max_len = min(max_len, config.max_seq_len)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "hpllm-score")

    def __call__(self, ids: list[int], top: int = 0) -> list[dict]:
        """One entry per token: {"token_id", "logprob", "top": [(id, logprob)] * top}, the
        first with logprob and top None. ids: 1 to max_len valid token ids."""
        if not 0 < len(ids) <= self.max_len:
            raise ValueError(f"a prompt to score has 1 to {self.max_len} tokens, "
                             f"not {len(ids)}")
        padded = np.zeros(pow2_bucket(len(ids), MIN_LENGTH_BUCKET, self.max_len), np.int32)
        padded[:len(ids)] = ids
        chosen, top_logp, top_ids = map(np.asarray, token_logprobs(
            self.params, jnp.asarray(padded), self.config, self.dtype, top))
        entries = [{"token_id": ids[0], "logprob": None, "top": None}]
        for j, token in enumerate(ids[1:]):
            entries.append({"token_id": token, "logprob": float(chosen[j]),
                            "top": [(int(t), float(v)) for t, v in
                                    zip(top_ids[j, :top], top_logp[j, :top])]})
        return entries

    async def score_async(self, ids: list[int], top: int = 0) -> list[dict]:
        return await asyncio.wrap_future(self._worker.submit(self, ids, top))
