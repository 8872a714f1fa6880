"""The engine's one estimator: a moving average with a fading memory, and what is built on it.
Every adaptive policy (draft length, rest and bets, lookup guesses) reads the run's recent record
through these, so a run that changes character (prose turning into code) is followed within a
few passes. No torch."""

from __future__ import annotations

from dataclasses import dataclass

from amusd_viz.bound import DEAR_TOKEN


class Ema:
    """An exponential moving average: each new value counts `1 - keep` of the total. Starts at
    `prior` (None: at the first value observed)."""

    def __init__(self, keep: float, prior: float | None = None) -> None:
        self.keep = keep
        self.value = prior

    def add(self, x: float) -> float:
        self.value = x if self.value is None else self.keep * self.value + (1 - self.keep) * x
        return self.value


class Rate:
    """Successes per trial lately: a ratio of two moving averages of the same memory (each
    trial's weight fades by `keep` per observation), with a prior of `hits` in `trials`."""

    def __init__(self, hits: float, trials: float, keep: float = 0.9) -> None:
        # a prior of n trials weighs what n trials observed at once would
        self._hits, self._trials = Ema(keep, (1 - keep) * hits), Ema(keep, (1 - keep) * trials)

    def add(self, hits: float, trials: float) -> None:
        self._hits.add(hits)
        self._trials.add(trials)

    @property
    def hits(self) -> float:
        """Hits lately, each weighed by how recent it is (a fading count)."""
        assert self._hits.value is not None
        return self._hits.value / (1 - self._hits.keep)

    @property
    def trials(self) -> float:
        assert self._trials.value is not None
        return self._trials.value / (1 - self._trials.keep)

    @property
    def value(self) -> float:
        return self.hits / self.trials


class Calibration:
    """How well the draft's own confidence (its probability of each token it proposes) has
    predicted acceptance so far in this run: accepted drafts / the sum of their confidences,
    over checked drafts (the accepted ones and the first rejected one), with a prior of 1 and a
    fading memory. A sharp draft is often surer than it should be; a tiny one, or one sampled
    at a high temperature, is often right with a low probability."""

    LOW, HIGH = 0.2, 5.0

    def __init__(self) -> None:
        self.per_confidence = Rate(2.0, 2.0)  # accepted / predicted
        self.per_check = Rate(2.0, 2.0)  # accepted / checked

    def observe(self, confs: list[float], accepted: int) -> None:
        """`confs`: the checked drafts' confidences, in order; the first `accepted` passed."""
        self.per_confidence.add(accepted, sum(confs))
        self.per_check.add(accepted, len(confs))

    @property
    def predicted(self) -> float:
        """The fading sum of the checked drafts' confidences (the accepted count predicted)."""
        return self.per_confidence.trials

    @property
    def accepted(self) -> float:
        return self.per_confidence.hits

    @property
    def acceptance(self) -> float:
        """Accepted drafts per checked draft, lately (1 before any verdict)."""
        return self.per_check.value

    @property
    def factor(self) -> float:
        return min(self.HIGH, max(self.LOW, self.per_confidence.value))

    def chance(self, conf: float) -> float:
        """The chance a draft of this confidence is accepted, by this run's record."""
        return min(1.0, conf * self.factor)


@dataclass(frozen=True)
class PassCost:
    """What a model's forward pass costs on its device, measured at load (loading.warm_up): a
    one-token pass, and each further token fed in the same pass. On a GPU, or a CPU with matrix
    units (AMX, AVX-512 bf16), a pass of a dozen tokens costs about one token's: the weights are
    read once. On a CPU without them (AVX2 only) each token costs most of a pass, so a pass
    verifying k drafts costs nearly k passes and a draft must pay for its own verification."""

    one_s: float
    per_token_s: float

    @property
    def extra(self) -> float:
        """An extra token's cost, in one-token passes."""
        return self.per_token_s / self.one_s if self.one_s > 0 else 0.0

    @property
    def dear(self) -> bool:
        return self.extra > DEAR_TOKEN  # bound.py: where no draft pays for its place


FLAT = PassCost(0.0, 0.0)  # the null cost: not measured (a lookup computes nothing)
