"""The run summary (the JSON that `--headless` prints and `--summary-json` writes). It embeds the
run's statistics, so ms/token, acceptance and the rest are computed in one place (stats.py).
No torch, no textual."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, computed_field

from amusd_viz import lossless
from amusd_viz.bound import dear_tokens
from amusd_viz.stats import RunStats


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


class RunSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    strategy: str
    draft: str | None
    target: str
    draft_device: str | None
    target_device: str
    dtype: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    stop_reason: str
    draft_lost: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # None when greedy (no randomness to repeat)
    acceptance: str = "greedy"  # greedy | coupled | rejection
    stats: RunStats

    @computed_field  # type: ignore[prop-decorator]
    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def wall_s(self) -> float | None:
        return round(self.stats.wall_s, 4) if self.stop_reason != "failed" else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ms_per_token(self) -> float | None:
        return _round(self.stats.ms_per_token, 2) if self.token_ids else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mean_accepted_per_pass(self) -> float | None:
        return self.stats.mean_accepted_per_pass

    @computed_field  # type: ignore[prop-decorator]
    @property
    def acceptance_rate(self) -> float | None:
        return self.stats.acceptance_rate

    @computed_field  # type: ignore[prop-decorator]
    @property
    def acceptance_per_check(self) -> float | None:
        return self.stats.acceptance_per_check

    @computed_field  # type: ignore[prop-decorator]
    @property
    def expected_acceptance(self) -> float | None:
        return self.stats.expected_acceptance

    @computed_field  # type: ignore[prop-decorator]
    @property
    def lossless_note(self) -> str | None:
        return lossless.note(self.dtype, self.target_device)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def speed_note(self) -> str | None:
        """Where speculation cannot pay on this hardware, and what the engine did about it."""
        aside = dear_tokens(self.strategy, self.stats.extra_token)
        if aside is None:
            return None
        return (f"On this CPU an {aside} (no AVX-512 or AMX matrix units): a verify pass of k "
                "drafts costs nearly k passes, so no draft pays for its place. With the adaptive "
                "policies (the default) the drafts step aside and the target decodes alone; "
                "--adaptive off speculates anyway, slower here.")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)
