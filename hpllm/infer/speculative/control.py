"""How much to speculate, and what it gained: the adaptive draft length, the acceptance
figures (one stats type for the single stream and the engine), and which requests may
speculate at all."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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

    def measured(self, n_proposed: int, draft_seconds: float, verify_seconds: float) -> None:
        pass  # this heuristic does not look at costs

    def update(self, n_accepted: int, n_proposed: int) -> None:
        if not self.adaptive or n_proposed == 0:
            return
        if n_accepted == n_proposed:
            self.gamma = min(self.max_gamma, self.gamma + 2)
        else:
            self.gamma = max(1, self.gamma - 1)


def expected_tokens(alpha: float, gamma: float) -> float:
    """Tokens a round emits when each of gamma drafts is accepted with probability alpha
    (independently, up to the first rejection) plus the target's own token: (1 - a^(g+1)) /
    (1 - a) (Leviathan et al.)."""
    return gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


class _Average:
    """An exponential moving average of a cost in seconds that skips its first sample (the
    first call of a new shape compiles) and clips later ones to [1/2, 2] x the average
    (a compile or a stall elsewhere on a shared machine is not the cost of a pass)."""

    def __init__(self, decay: float):
        self.decay, self.seen, self.value = decay, 0, None

    def add(self, x: float) -> None:
        self.seen += 1
        if self.seen == 1:
            return
        if self.value is None:
            self.value = x
        else:
            x = min(max(x, self.value / 2), self.value * 2)
            self.value = self.decay * self.value + (1 - self.decay) * x


class CostModelGamma:
    """Each round's gamma maximises the expected tokens per second of a round,
    expected_tokens(a, g) / (g d + v(g)), from figures measured as the stream runs: the
    acceptance rate a (accepted and rejected drafts, decayed per round so that it follows the
    text), the draft's seconds per token d (~0 for n-gram lookup) and the verify pass's
    seconds v(g), a least-squares line v0 + g v1 through the averaged costs of the pass
    lengths seen (until two are seen, v1 = PRIOR_ROW_COST v0). Where a (g+1)-row pass costs
    little more than one row (a memory-bound step), this speculates deeply on a good draft;
    where it costs g+1 times as much, it keeps gamma at 1. gamma stays >= 1, so every round
    measures acceptance; `gamma` holds the choice for the next round."""

    PRIOR_ROW_COST = 0.05  # a kernel step's extra cost per row, relative to one row (measured)

    def __init__(self, gamma: int, max_gamma: int, decay: float = 0.8,
                 prior_alpha: float = 0.5, prior_rounds: float = 2.0):
        self.gamma, self.max_gamma, self.decay = gamma, max_gamma, decay
        self.accepts, self.rejects = prior_alpha * prior_rounds, (1 - prior_alpha) * prior_rounds
        self.verify: dict[int, _Average] = {}
        self.draft = _Average(decay)

    @property
    def alpha(self) -> float:
        return self.accepts / (self.accepts + self.rejects)

    def measured(self, n_proposed: int, draft_seconds: float, verify_seconds: float) -> None:
        self.verify.setdefault(n_proposed, _Average(self.decay)).add(verify_seconds)
        if n_proposed:
            self.draft.add(draft_seconds / n_proposed)

    def verify_line(self) -> tuple[float, float] | None:
        """(v0, v1) seconds of the verify pass's line, None before any pass is measured."""
        points = [(g, a.value) for g, a in self.verify.items() if a.value is not None]
        if not points:
            return None
        g = np.asarray([p[0] for p in points], float)
        v = np.asarray([p[1] for p in points], float)
        if len(points) == 1:
            v0 = v[0] / (1 + self.PRIOR_ROW_COST * g[0])
            return v0, self.PRIOR_ROW_COST * v0
        v1, v0 = np.polyfit(g, v, 1)
        return max(v0, 1e-9), max(v1, 0.0)

    def best(self) -> int:
        line = self.verify_line()
        if line is None:
            return self.gamma
        v0, v1 = line
        d = self.draft.value or 0.0
        rate = lambda g: expected_tokens(self.alpha, g) / (g * d + v0 + g * v1)
        return max(range(1, self.max_gamma + 1), key=rate)

    def update(self, n_accepted: int, n_proposed: int) -> None:
        if n_proposed == 0:
            return
        self.accepts = self.decay * self.accepts + n_accepted
        self.rejects = self.decay * self.rejects + (n_accepted < n_proposed)
        self.gamma = self.best()


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
