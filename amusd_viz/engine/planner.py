"""What amusd's draft does next: extend its line, grow a branch of the speculation cache
(engine/speccache.py), or rest. While the target verifies, each step goes to the most valuable:

- its **main line**: one more draft after its last one, needed only if every draft before it is
  accepted: worth the chance of that, the product of the draft's own (calibrated) confidences
  from the committed text on;
- a **branch**: worth the chance the target commits the branch's bet, times the confidences of
  the branch's own drafts so far (speccache.py);
- **rest**, when it `rests` and nothing is worth at least `MIN_VALUE` (on a CPU a draft step
  slows the target's pass on the other core through the shared memory bus; on two cores a
  resting draft lends its core: engine/schedule.py), or always where extra tokens in a pass are
  dear (estimate.PassCost: an AVX2-only CPU), where a pass on one core verifying drafts loses
  to a plain pass on the lent two whatever the drafts' chances.
"""

from __future__ import annotations

from amusd_viz.engine.estimate import FLAT, Calibration, PassCost
from amusd_viz.engine.passes import Drafter, Step
from amusd_viz.engine.request import Request
from amusd_viz.engine.shared import SharedState
from amusd_viz.engine.speccache import NoCache

MIN_VALUE = 0.1  # rest rather than compute a token needed with less than this chance

EXTEND = "extend"


class Planner:
    """The amusd draft's choices (see the module's docstring): extend its line, grow a branch
    of its `cache` (a `BranchCache`, or the null `NoCache`), or rest (when it `rests` and
    nothing is worth it). `info` holds the step behind each main-line draft (by generated
    position): its confidence and runner-up."""

    def __init__(self, req: Request, drafter: Drafter, shared: SharedState, cache: NoCache,
                 rests: bool, cost: PassCost = FLAT) -> None:
        self.req, self.drafter, self.shared, self.cache, self.rests = req, drafter, shared, cache, rests
        self.cost = cost  # the target's passes (Request.target_cost): what a draft adds to one
        self.n_prompt = req.n_prompt
        self.info: dict[int, Step] = {}
        self.calibration = Calibration()  # the draft's confidence vs acceptance
        self._judged = 0  # generated positions whose verdict the calibration has seen

    @property
    def for_good(self) -> bool:
        """It rests for the whole run: extra tokens are dear."""
        return self.rests and self.cost.dear

    def survival(self, start: int, stop: int) -> float:
        """The chance that the main line's drafts at generated positions [start, stop) are all
        accepted, by the draft's own confidence."""
        p = 1.0
        for pos in range(start, stop):
            step = self.info.get(pos)
            p *= self.calibration.chance(step.conf) if step is not None else 1.0
        return p

    def choose(self, seq: list[int], committed: list[int], can_extend: bool,
               floor: float | None = None):
        """EXTEND, a Branch to grow (new ones are created here), or None to rest (when it
        rests and nothing is worth `floor`, by default MIN_VALUE)."""
        first, end = len(committed) - self.n_prompt, len(seq) - self.n_prompt
        options: list[tuple[float, object]] = [(self.survival(first, end), EXTEND)] if can_extend else []
        options += self.cache.options(self, first, end)
        if not options:
            return None
        value, best = max(options, key=lambda o: o[0])
        if self.for_good or (self.rests and value < (MIN_VALUE if floor is None else floor)):
            return None
        if isinstance(best, tuple):  # a new branch at this position
            pos, step = best
            best = self.cache.open_branch(self, pos, step, value, seq)
        return best

    def observe(self, seq: list[int], committed: list[int]) -> None:
        """Calibrate on the main-line drafts the target has judged since the last look: those
        it committed as they were, then the first it did not."""
        n = self.n_prompt
        start, stop = max(self._judged, 0), min(len(seq), len(committed)) - n
        confs, accepted = [], 0
        for pos in range(start, stop):
            step = self.info.get(pos)
            if step is None or step.token != seq[n + pos]:
                continue  # not a draft of this line (adopted from the committed text)
            confs.append(step.conf)
            if committed[n + pos] != step.token:
                self.cache.observe_bet(step, committed[n + pos])
                break
            accepted += 1
        if confs:
            self.calibration.observe(confs, accepted)
        self._judged = max(self._judged, len(committed) - n)
