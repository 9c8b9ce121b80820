"""Request workloads for the serving benchmarks: prompts cut from the Shakespeare validation
split (real text, tokenized by the model's own tokenizer) with lengths from a stated
distribution and a fixed seed, so runs are comparable."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from hpllm.train.data import shakespeare_validation_texts


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int


@functools.lru_cache(maxsize=2)  # a benchmark's warm-up and its run share one tokenization
def _validation_ids(tokenizer) -> list[int]:
    text = "\n\n".join(shakespeare_validation_texts())
    return tokenizer.encode(text[:2_000_000], bos=False)


def shakespeare_requests(tokenizer, n: int, prompt_len=(32, 256), output_len=(16, 128),
                         seed: int = 0) -> list[Request]:
    """n requests: prompt lengths and output lengths uniform in the given inclusive ranges
    (tokens); each prompt is a window of the validation split starting at a random token."""
    ids = _validation_ids(tokenizer)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(prompt_len[0], prompt_len[1] + 1, n)
    outputs = rng.integers(output_len[0], output_len[1] + 1, n)
    starts = rng.integers(0, len(ids) - prompt_len[1], n)
    return [Request(list(ids[s:s + p]), int(o)) for s, p, o in zip(starts, prompts, outputs)]
