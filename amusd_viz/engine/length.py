"""Draft-length policies: how far the draft drafts before the target checks (sync's pass, amusd's
turn on a shared device). Called unconditionally by the loops; `FixedLength` is the null
version (the lookahead, always). After vLLM's draft-length policy protocol."""

from __future__ import annotations

from amusd_viz.engine.estimate import Calibration, Ema


class FixedLength:
    """Draft the whole lookahead."""

    def one_more(self, confs: list[float]) -> bool:
        return True

    def observe_draft(self, secs: float | None) -> None:
        pass

    def observe_verify(self, secs: float, confs: list[float], accepted: int) -> None:
        pass


class DraftBudget(FixedLength):
    """Adaptive lookahead: after k drafts whose chance of all being accepted is P_k (the product
    of the draft's calibrated confidences), one more draft costs a draft step and adds at most
    P_k expected tokens; it is worth it while P_k / draft_s beats the pass's expected rate,
    E_k / (k * draft_s + verify_s), with E_k = 1 + P_1 + ... + P_k. On a CPU a verify pass of up
    to ~8 tokens costs about one token's pass, so the lookahead stays the upper bound."""

    def __init__(self) -> None:
        self.draft_s = Ema(0.8)
        self.verify_s = Ema(0.8)
        self.calibration = Calibration()

    def observe_draft(self, secs: float | None) -> None:
        if secs is not None:
            self.draft_s.add(secs)

    def observe_verify(self, secs: float, confs: list[float], accepted: int) -> None:
        self.verify_s.add(secs)
        self.calibration.observe(confs[:accepted + 1], accepted)

    def survivals(self, confs: list[float]) -> list[float]:
        out, p = [], 1.0
        for conf in confs:
            p *= self.calibration.chance(conf)
            out.append(p)
        return out

    def one_more(self, confs: list[float]) -> bool:
        draft_s, verify_s = self.draft_s.value, self.verify_s.value
        if not confs or draft_s is None or verify_s is None:
            return True
        survivals = self.survivals(confs)
        rate = (1 + sum(survivals)) / (len(confs) * draft_s + verify_s)
        return survivals[-1] / draft_s >= rate
