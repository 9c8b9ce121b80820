"""Text in, text out for pretrained models: streaming completion and multi-turn chat, on top
of `generate` (token ids) and the model's tokenizer (ids <-> text, chat template). Sampling is
described by the engine's SamplingParams; this single-stream path uses its max_tokens,
temperature, top_k, top_p and seed (None: 0) and refuses the rest."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, replace

from hpllm.infer.generate import PromptError, generate
from hpllm.infer.sampling import SamplingError, SamplingParams
from hpllm.model.transformer import unstack_layers

SINGLE_STREAM_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed")


def check_single_stream(sampling: SamplingParams) -> SamplingParams:
    """The parameters validated, and an error naming any set that this path does not apply
    (those need the engine: `hpllm serve` or hpllm.infer.llm.LLM)."""
    sampling.validate()
    default = SamplingParams()
    for f in dataclasses.fields(SamplingParams):
        if f.name not in SINGLE_STREAM_FIELDS and (getattr(sampling, f.name)
                                                    != getattr(default, f.name)):
            raise SamplingError(f"{f.name}: single-stream generation applies only "
                                f"{', '.join(SINGLE_STREAM_FIELDS)} (use the engine)", f.name)
    return sampling


@dataclass
class Stats:
    """Filled in while a stream runs: tokens generated and the seconds they took."""
    prompt_tokens: int = 0
    tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float = 0.0  # prefill + first sample (includes compilation)
    second_token_seconds: float = 0.0  # + the first decode step (includes its compilation)

    @property
    def decode_tokens_per_second(self) -> float:
        """Steady decode rate: tokens after the second over the time they took, so that no
        compilation is counted (0 when too few tokens to tell)."""
        rest = self.seconds - self.second_token_seconds
        return (self.tokens - 2) / rest if self.tokens > 2 and rest > 0 else 0.0


def stream_ids(model, prompt_ids: list[int], sampling: SamplingParams,
               stats: Stats | None = None, kv_dtype: str = "float32"):
    """Text pieces of the continuation of `prompt_ids`, one per token (possibly empty while a
    multi-byte character is incomplete), stopping at the model's end-of-turn tokens.
    kv_dtype: the KV cache's, float32, bfloat16 or int8 (see `generate`)."""
    check_single_stream(sampling)
    stats = stats if stats is not None else Stats()
    if len(prompt_ids) >= model.config.max_seq_len:
        raise PromptError(f"prompt of {len(prompt_ids)} tokens does not fit the context of "
                          f"{model.config.max_seq_len}")
    tok = model.tokenizer
    stats.prompt_tokens = len(prompt_ids)
    yield from text_pieces(
        generate(model.params, model.config, prompt_ids, sampling.max_tokens,
                 temperature=sampling.temperature, top_k=max(sampling.top_k, 0),
                 top_p=sampling.top_p, seed=sampling.seed or 0, stop_ids=tok.stop_ids,
                 kv_dtype=kv_dtype),
        tok, stats)


def text_pieces(tokens, tokenizer, stats: Stats):
    """Printable pieces of a stream of token ids, filling in `stats` as it runs and stopping
    at the tokenizer's end-of-turn ids (shared by plain and speculative generation)."""
    decoder = tokenizer.stream()
    start = time.perf_counter()
    for token in tokens:
        stats.tokens += 1
        stats.seconds = time.perf_counter() - start
        if stats.tokens == 1:
            stats.first_token_seconds = stats.seconds
        elif stats.tokens == 2:
            stats.second_token_seconds = stats.seconds
        if token in tokenizer.stop_ids:
            break
        yield decoder.push(token)
    yield decoder.flush()


def complete(model, prompt: str, sampling: SamplingParams, stats: Stats | None = None,
             kv_dtype: str = "float32"):
    """Stream the continuation of a plain-text prompt."""
    if not prompt:
        raise PromptError("the prompt is empty")
    return stream_ids(model, model.tokenizer.encode(prompt), sampling, stats, kv_dtype)


@dataclass
class ChatSession:
    """A conversation: each `say` renders the whole history with the chat template and
    streams the assistant's reply, which joins the history once complete."""
    model: object
    sampling: SamplingParams
    messages: list[dict] = field(default_factory=list)
    kv_dtype: str = "float32"

    def __post_init__(self):
        # generate() unstacks the layers for decoding on every call; do it once per session
        # instead of once per turn (it copies every weight).
        self.model = replace(self.model, params=unstack_layers(self.model.params))

    def say(self, text: str, stats: Stats | None = None):
        if not text.strip():
            raise PromptError("the message is empty")
        tok = self.model.tokenizer
        history = self.messages + [{"role": "user", "content": text}]
        prompt = tok.encode(tok.apply_chat_template(history), special=True)
        # a new seed each turn, so a sampled chat does not repeat its choices
        sampling = replace(self.sampling, seed=(self.sampling.seed or 0) + len(self.messages))
        pieces = []
        for piece in stream_ids(self.model, prompt, sampling, stats, self.kv_dtype):
            pieces.append(piece)
            yield piece
        self.messages = history
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})
