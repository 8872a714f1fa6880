"""Draft-length policies: how far the draft drafts before the target checks (sync's pass, amusd's
turn on a shared device). Called unconditionally by the loops; `FixedLength` is the null
version (the lookahead, always). After vLLM's draft-length policy protocol."""

from __future__ import annotations

from amusd_viz.engine.estimate import FLAT, Calibration, Ema, PassCost

# Where extra tokens are dear, the first draft must beat a plain pass by this much: a pass
# with drafts also pays what the model leaves out (the draft's prefill, judging the drafts).
# At 1.0 a bench here drafted at break-even on code and ran 0.92x ar.
FIRST_DRAFT_MARGIN = 1.1


class FixedLength:
    """Draft the whole lookahead."""

    def one_more(self, confs: list[float], behind: int = 0) -> bool:
        """`confs`: the drafts so far in this line; `behind`: tokens the draft must feed
        before its next step (its prefill, where it has not drafted yet in this run)."""
        return True

    def observe_draft(self, secs: float | None) -> None:
        pass

    def observe_verify(self, secs: float, confs: list[float], accepted: int) -> None:
        pass


class DraftBudget(FixedLength):
    """Adaptive lookahead: after k drafts whose chance of all being accepted is P_k (the product
    of the draft's calibrated confidences), one more draft costs a draft step and adds at most
    P_k expected tokens; it is worth it while P_k / draft_s beats the pass's expected rate,
    E_k / (k * draft_s + verify_s), with E_k = 1 + P_1 + ... + P_k. Each draft also adds a
    token to the verify pass: `cost` (the target's, measured at load) says what that costs,
    nearly nothing on a GPU or a CPU with matrix units. Where it is dear (AVX2-only CPUs), the
    first draft must pay too: a pass drafts nothing, a plain decode step, unless the chance of
    acceptance times a pass beats a draft step and its token in the pass."""

    def __init__(self, cost: PassCost = FLAT, draft_cost: PassCost | None = None) -> None:
        # where extra tokens are dear and both passes were timed at load (sync), the first pass
        # already decides from those times (drafting the lookahead would cost ~lookahead
        # passes); elsewhere the first pass drafts the lookahead and is timed
        both = cost.dear and draft_cost is not None and draft_cost.one_s > 0
        self.draft_s = Ema(0.8, draft_cost.one_s if both and draft_cost else None)
        # a one-token verify pass: each drafted token's cost taken off
        self.verify_s = Ema(0.8, cost.one_s if both else None)
        self.calibration = Calibration()
        self.cost = cost
        self.draft_cost = draft_cost or FLAT

    def observe_draft(self, secs: float | None) -> None:
        if secs is not None:
            self.draft_s.add(secs)

    def observe_verify(self, secs: float, confs: list[float], accepted: int) -> None:
        self.verify_s.add(secs / (1 + self.cost.extra * len(confs)))
        self.calibration.observe(confs[:accepted + 1], accepted)

    def survivals(self, confs: list[float]) -> list[float]:
        out, p = [], 1.0
        for conf in confs:
            p *= self.calibration.chance(conf)
            out.append(p)
        return out

    def one_more(self, confs: list[float], behind: int = 0) -> bool:
        draft_s, verify_s = self.draft_s.value, self.verify_s.value
        if draft_s is None or verify_s is None:
            return True
        step_s = draft_s + self.cost.extra * verify_s  # a draft, and its token in the pass
        if not confs:  # cheap extra tokens: always draft (the rule below stops the line early)
            # where dear, the draft's catch-up counts too: a prefill of the prompt on an AVX2
            # host cost 7.8 s in one bench run, for one draft judged in the next pass
            catch_up = max(0, behind - 1) * self.draft_cost.per_token_s
            return (not self.cost.dear or self.calibration.acceptance * verify_s
                    >= FIRST_DRAFT_MARGIN * (step_s + catch_up))
        survivals = self.survivals(confs)
        rate = (1 + sum(survivals)) / (len(confs) * step_s + verify_s)
        return survivals[-1] / step_s >= rate
