"""How much to speculate, and what it gained: the adaptive draft length, the acceptance
figures (one stats type for the single stream and the engine), and which requests may
speculate at all."""

from __future__ import annotations

from dataclasses import dataclass, field

from hpllm.infer.sampling import SamplingParams


@dataclass
class SpeculativeStats:
    rounds: int = 0  # target verification passes (engine: sequence-steps that scored drafts)
    proposed: int = 0  # draft tokens scored by the target
    accepted: int = 0
    generated: int = 0  # tokens emitted (accepted + one per round)
    gammas: list = field(default_factory=list)  # drafts proposed per round (single stream)

    def record(self, n_proposed: int, n_accepted: int) -> None:
        """One verification round."""
        self.rounds += 1
        self.proposed += n_proposed
        self.accepted += n_accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.generated / self.rounds if self.rounds else 0.0


class AdaptiveGamma:
    """gamma grows by 2 after a round where every draft was accepted and shrinks by 1 after a
    rejection (the heuristic of Hugging Face's assisted generation), within [1, max_gamma]."""

    def __init__(self, gamma: int, max_gamma: int, adaptive: bool):
        self.gamma, self.max_gamma, self.adaptive = gamma, max_gamma, adaptive

    def update(self, n_accepted: int, n_proposed: int) -> None:
        if not self.adaptive or n_proposed == 0:
            return
        if n_accepted == n_proposed:
            self.gamma = min(self.max_gamma, self.gamma + 2)
        else:
            self.gamma = max(1, self.gamma - 1)


def speculable(params: SamplingParams) -> bool:
    """Requests with penalties or logprobs do not speculate: their processors depend on every
    previous token, or they report figures the accept step does not compute. Nor do
    constrained or biased ones: drafts are not checked against a grammar and the accept step
    applies neither the mask nor logit_bias."""
    return (not params.has_penalties and params.logprobs is None
            and params.structured is None and not params.logit_bias)


def draft_cached_until(start: int, n_accepted: int, n_proposed: int) -> int:
    """After a round whose last context token was at `start`: the draft fed positions
    start .. start + n_proposed - 1 (that token, then drafts 1..n_proposed-1), and those
    holding tokens the target kept are valid draft context. Positions below the result are."""
    return start + min(n_accepted, max(n_proposed - 1, 0)) + 1
