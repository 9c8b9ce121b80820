"""Offline batched generation, in the spirit of vLLM's `LLM`:

    llm = LLM("smollm2-135m")
    outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    outs[0].outputs[0].text
"""

from __future__ import annotations

from hpllm.checkpoints.registry import load_model
from hpllm.config import EngineConfig
from hpllm.infer.engine import EngineCore
from hpllm.infer.requests import RequestOutput
from hpllm.infer.sampling import SamplingParams


class LLM:
    """Runs an EngineCore until every request of a `generate` call has finished."""

    def __init__(self, model, engine_config: EngineConfig | None = None, **engine_kw):
        """model: a PretrainedModel or a name/path for hpllm.checkpoints.registry.load_model."""
        if isinstance(model, str):
            model = load_model(model, progress=False)
        ec = engine_config or EngineConfig(**engine_kw)
        self.model = model
        self.engine = EngineCore(model.params, model.config, model.tokenizer, ec)
        self._counter = 0

    def generate(self, prompts, sampling_params=None,
                 progress: bool = False) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists. sampling_params:
        one SamplingParams for all, or one per prompt. Returns RequestOutputs in prompt
        order. All requests are validated before any is queued."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else (
            [sampling_params or SamplingParams()] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                self._counter += 1
                ids.append(str(self._counter))
                self.engine.add_request(ids[-1], prompt, p)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        results = {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), unit="req")
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update()
        if bar is not None:
            bar.close()
        return [results[rid] for rid in ids]
