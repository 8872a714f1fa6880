"""`amusd-viz bench`: every strategy on the same prompts, models, dtype and machine, in one run.

Each strategy gets one engine (its worker processes load once, warm up on an untimed run, then
serve every prompt); engines run one after another so they never compete for cores or memory.
Timings are prompt-in to last-token-out, medians over prompts (and repeats); every strategy's
tokens are compared with `ar`'s.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from amusd_viz import lossless
from amusd_viz import stats as run_stats
from amusd_viz.bench_report import print_report, require_matplotlib, write_outputs
from amusd_viz.config import DEFAULT_NGRAM_N, BenchConfig, EngineStrategy
from amusd_viz.errors import UserError
from amusd_viz.events import EventList, RunFinished, RunStarted

if TYPE_CHECKING:
    from amusd_viz.engine.session import Engine

# name -> (engine strategy, target device kind, uses the draft)
KNOWN: dict[str, tuple[EngineStrategy, str, bool]] = {
    "ar": ("ar", "all", False),
    "ar-1dev": ("ar", "one", False),
    "sync": ("sync", "all", True),
    "sync-1dev": ("sync", "one", True),
    "sync-2dev": ("sync", "two", True),
    "amusd": ("amusd", "two", True),
    "amusd-1dev": ("amusd", "one", True),
    "hf-generate": ("hf-generate", "all", False),
    "hf-assisted": ("hf-assisted", "all", True),
    # the model-free drafter beside the model draft (a lookup needs no core of its own)
    "sync-ngram": ("sync", "all", True),
    "amusd-ngram": ("amusd", "all", True),
    "hf-lookup": ("hf-assisted", "all", True),
}
NGRAM_RUNS = {"sync-ngram", "amusd-ngram", "hf-lookup"}  # these draft with `ngram`
# the same engine with a policy switched off, to race the two (RunConfig fields)
VARIANTS: dict[str, dict] = {
    "sync-fixed": {"adaptive": False},
    "amusd-nocache": {"spec_cache": False},
    "amusd-plain": {"spec_cache": False, "adaptive": False},
    "amusd-nosib": {"siblings": False},
    "amusd-notree": {"tree": False},
    "sync-notree": {"tree": False},
    "amusd-1dev-plain": {"adaptive": False, "tree": False},
    "sync-noguess": {"draft_lookup": False},
    "amusd-noguess": {"draft_lookup": False},
    "amusd-nolend": {"lend_core": False},
}
for _name in VARIANTS:
    KNOWN[_name] = KNOWN[_name.rsplit("-", 1)[0]]
DESCRIPTIONS = {
    "ar": "target alone, all cores / its GPU (the strongest plain baseline)",
    "ar-1dev": "target alone on one device (the paper's baseline)",
    "sync": "speculative decoding, models taking turns on all cores / one GPU",
    "sync-1dev": "speculative decoding on one device (on CPU: one core)",
    "sync-2dev": "speculative decoding, the draft on its device and the target on its own, "
                 "taking turns (on CPU one core each): the paper's baseline, amusd's devices",
    "amusd": "asynchronous: draft and target on two devices at once",
    "amusd-1dev": "asynchronous on one shared device (the workers take turns: on CPU one core)",
    "hf-generate": "plain transformers generate(), all cores",
    "hf-assisted": "transformers assisted generation with the same draft",
    "sync-ngram": "speculative decoding with the n-gram (prompt lookup) drafter, all cores",
    "amusd-ngram": "asynchronous, n-gram drafter in its own process, target on all cores",
    "hf-lookup": "transformers prompt lookup decoding (the same idea, its own code)",
    "sync-fixed": "sync drafting the full lookahead every time (--adaptive off)",
    "amusd-nocache": "amusd without the speculation cache (--spec-cache off)",
    "amusd-plain": "amusd with neither the cache nor the adaptive draft (both off)",
    "amusd-nosib": "amusd's cache without the runner-up bet fed beside each draft (siblings)",
    "amusd-notree": "amusd's cache with branches checked only in the pass after a hit, not in "
                    "the main line's pass (tree passes off)",
    "sync-notree": "sync checking only its drafts, not the draft's other likely tokens beside "
                   "them (tree passes off)",
    "amusd-1dev-plain": "amusd on one device drafting the whole lookahead every turn, with no "
                        "bets beside its drafts (adaptive and tree passes off)",
    "sync-noguess": "sync drafting one token per draft pass, without lookup guesses "
                    "(--draft-lookup off)",
    "amusd-noguess": "amusd drafting one token per draft pass, without lookup guesses "
                     "(--draft-lookup off)",
    "amusd-nolend": "amusd on two CPU cores without lending the resting draft's core to the "
                    "target (--lend-core off)",
}


@dataclass
class Prompt:
    id: str
    prompt: str
    kind: str = "other"


def default_prompts_path() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "assets" / "prompts.jsonl", here.parent / "assets" / "prompts.jsonl"):
        if candidate.is_file():
            return candidate
    raise UserError("the bundled prompt set is missing; pass --prompts FILE.jsonl")


def load_prompts(path: Path) -> list[Prompt]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist. Pass a JSONL file with one "
                        '{"id": ..., "prompt": ...} a line.') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not valid JSON ({exc.msg}). Each line must be "
                            '{"id": ..., "prompt": ...}.') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise UserError(f'{path}:{n}: needs a non-empty "prompt" string (and an "id").')
        prompts.append(Prompt(str(obj.get("id", n)), obj["prompt"], str(obj.get("kind", "other"))))
    if not prompts:
        raise UserError(f"{path} holds no prompts.")
    return prompts


@dataclass
class Result:
    strategy: str
    prompt_id: str
    kind: str
    repeat: int
    new_tokens: int
    wall_s: float
    ms_per_token: float
    token_ids: list[int]
    mean_accepted_per_pass: float | None = None
    acceptance_rate: float | None = None
    acceptance_per_check: float | None = None  # accepted / checked draft tokens
    expected_acceptance: float | None = None  # sampling: mean sum(min(p, q))
    busy: dict = field(default_factory=dict)
    overlap: float | None = None
    curve: list[float] = field(default_factory=list)  # seconds at each committed token
    tops: list = field(default_factory=list)  # target top-5 ids and logits per position (ar)
    draft_lost: bool = False  # the draft worker died: the target finished alone
    target_passes: int = 0
    solo_passes: int = 0  # target passes without drafts
    lent_passes: int = 0  # amusd on two CPU cores: target passes on the draft's lent core too
    drafts_per_verify: float | None = None
    cache_hits: int = 0
    cache_misses: int = 0
    tree_hits: int = 0  # amusd: verdicts that went on along a branch in their own pass
    tree_tokens: int = 0  # the tokens committed past the bet that way
    guessed_drafts: int = 0  # drafts made in the pass before theirs (lookup guesses)
    draft_passes: int = 0  # the draft model's passes after its prefill
    target_pass_ms: float | None = None  # median target pass after the prefill
    draft_step_ms: float | None = None  # median draft model step
    best_ms_per_token: float | None = None  # the strategy with no waste (amusd_viz/bound.py)


def devices_for(kind: str, gpus: int, cores: list[int],
                target_option: str | None = None,
                draft_option: str | None = None) -> tuple[str, str]:
    """(target, draft) for a kind of run; --target-device / --draft-device, where given, win
    (the draft's only where it has a device of its own)."""
    target, draft = _default_devices(kind, gpus, cores)
    if target_option:
        target = target_option
        draft = draft if kind == "two" else target
    if draft_option and kind == "two":
        draft = draft_option
    return target, draft


def _default_devices(kind: str, gpus: int, cores: list[int]) -> tuple[str, str]:
    if gpus:
        return ("cuda:0", "cuda:1" if gpus > 1 and kind == "two" else "cuda:0")
    if kind == "all":
        return "cpu", "cpu"
    if kind == "one":
        return f"cpu:{cores[0]}", f"cpu:{cores[0]}"
    return f"cpu:{cores[0]}", f"cpu:{cores[1] if len(cores) > 1 else cores[0]}"


def median(xs):
    return statistics.median(xs) if xs else None


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _checked_for_identity(strategy: str, rule: str) -> bool:
    """Which runs promise `ar`'s exact ids: every strategy when greedy; ours (not transformers'
    own sampler) under the coupled rule; none under the rejection rule (its text depends on the
    draft and, for amusd, on timing: it promises a distribution)."""
    if rule == "greedy":
        return True
    return rule == "coupled" and not strategy.startswith("hf-")


def compare_with_ar(results: list[Result], dtype: str, rule: str = "greedy",
                    device: str = "cpu") -> list[dict]:
    """identical / near-tie (the diverging token is one of `ar`'s top-5 there, within a few ulps
    of its top logit: amusd_viz/lossless.py) / parted (a sampled run outside the exact
    mode: rounding can flip a perturbed near-tie, and the perturbed scores are not logged) /
    differs (a bug)."""
    ar = {(r.prompt_id, r.repeat): r for r in results if r.strategy == "ar"}
    verdicts = []
    for r in results:
        ref = ar.get((r.prompt_id, r.repeat)) or ar.get((r.prompt_id, 0))
        if r.strategy == "ar" or ref is None or not _checked_for_identity(r.strategy, rule):
            continue
        pos = _first_difference(r.token_ids, ref.token_ids)
        token = r.token_ids[pos] if pos is not None and pos < len(r.token_ids) else None
        top = (lossless.top_two(ref.tops[pos], token, ref.token_ids[pos])
               if pos is not None and pos < len(ref.tops) and pos < len(ref.token_ids) else None)
        if pos is None:
            verdict = "identical"
        elif rule != "greedy" and not lossless.exact(dtype, device):
            verdict = "parted"
        elif pos < len(r.token_ids) and lossless.is_near_tie(r.token_ids[pos], top, dtype, device):
            verdict = "near-tie"
        else:
            verdict = "differs"
        verdicts.append({"strategy": r.strategy, "prompt": r.prompt_id, "repeat": r.repeat,
                         "verdict": verdict, "first_difference": pos,
                         "top2_logit_gap": None if top is None else round(top.gap, 4),
                         "tolerance": None if top is None or lossless.exact(dtype, device)
                         else round(lossless.tolerance(top, dtype), 4)})
    return verdicts


def summarize(results: list[Result], names: list[str]) -> dict:
    def block(rows: list[Result]) -> dict:
        out = {}
        for name in names:
            mine = [r for r in rows if r.strategy == name]
            if not mine:
                continue
            ms = [r.ms_per_token for r in mine]
            acc = [r.mean_accepted_per_pass for r in mine if r.mean_accepted_per_pass is not None]
            rate = [r.acceptance_rate for r in mine if r.acceptance_rate is not None]
            expected = [r.expected_acceptance for r in mine if r.expected_acceptance is not None]
            per_check = [r.acceptance_per_check for r in mine
                         if r.acceptance_per_check is not None]
            busy: dict[str, list[float]] = {}
            for r in mine:
                for dev, share in r.busy.items():
                    busy.setdefault(dev, []).append(share)
            overlap = [r.overlap for r in mine if r.overlap is not None]
            passes = sum(r.target_passes for r in mine)
            verdicts = sum(r.cache_hits + r.cache_misses for r in mine)
            drafts = [r.drafts_per_verify for r in mine if r.drafts_per_verify is not None]
            best = [r.best_ms_per_token for r in mine if r.best_ms_per_token is not None]
            times = {what: [getattr(r, what) for r in mine if getattr(r, what) is not None]
                     for what in ("target_pass_ms", "draft_step_ms")}
            out[name] = {
                "runs": len(mine),
                # runs whose draft died (out of memory, say): the target decoded alone, so
                # these are not timings of the strategy
                "draft_lost_runs": sum(r.draft_lost for r in mine),
                "median_ms_per_token": round(median(ms), 2),
                "min_ms_per_token": round(min(ms), 2),
                "max_ms_per_token": round(max(ms), 2),
                "mean_accepted_per_pass": round(statistics.mean(acc), 3) if acc else None,
                "acceptance_rate": round(statistics.mean(rate), 3) if rate else None,
                "acceptance_per_check": round(statistics.mean(per_check), 3) if per_check
                else None,
                "expected_acceptance": round(statistics.mean(expected), 3) if expected else None,
                "busy": {d: round(median(v), 3) for d, v in busy.items()},
                "both_busy": round(median(overlap), 3) if overlap else None,
                # target passes without drafts, of all passes after the prefill
                "solo_share": round(sum(r.solo_passes for r in mine) / passes, 3) if passes
                else None,
                "drafts_per_verify": round(statistics.mean(drafts), 2) if drafts else None,
                "cache_hit_rate": round(sum(r.cache_hits for r in mine) / verdicts, 3)
                if verdicts else None,
                "tree_hits": sum(r.tree_hits for r in mine),
                "tree_tokens": sum(r.tree_tokens for r in mine),
                "guessed_drafts": sum(r.guessed_drafts for r in mine),
                "draft_passes": sum(r.draft_passes for r in mine),
                **{what: round(median(v), 1) if v else None for what, v in times.items()},
                # the same pass times and acceptance with no waste (amusd_viz/bound.py)
                "best_ms_per_token": round(median(best), 2) if best else None,
            }
        return _with_speedups(out, rows)

    kinds = sorted({r.kind for r in results})
    return {"overall": block(results), "by_kind": {k: block([r for r in results if r.kind == k])
                                                   for k in kinds}}


@dataclass(frozen=True)
class PlannedRun:
    """One column of the report: a strategy (at one lookahead) on its devices."""

    label: str  # "amusd", or "amusd@4" in a lookahead sweep
    name: str  # a KNOWN strategy
    lookahead: int

    @property
    def engine_strategy(self) -> EngineStrategy:
        return KNOWN[self.name][0]


@dataclass
class BenchPlan:
    cfg: BenchConfig
    runs: list[PlannedRun]
    prompts: list[Prompt]
    gpus: int
    cores: list[int]


def plan_runs(cfg: BenchConfig, gpus: int, cores: list[int]) -> BenchPlan:
    """Check the strategies and prompts, and list the runs (ar always: the reference)."""
    names = list(cfg.strategies)
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise UserError(f"unknown strategy {unknown[0]!r} in --strategies. Known: "
                        f"{', '.join(KNOWN)}.")
    if "ar" not in names:
        names.insert(0, "ar")  # the reference for speedups and losslessness
    prompts = load_prompts(cfg.prompts or default_prompts_path())
    if cfg.kinds:
        prompts = [p for p in prompts if p.kind in cfg.kinds]
    if cfg.limit:
        prompts = prompts[: cfg.limit]
    if not prompts:
        raise UserError("no prompts left after --kinds/--limit.")
    runs: list[PlannedRun] = []
    seen: dict[tuple, str] = {}
    for name in names:
        setup = (KNOWN[name][0], name in NGRAM_RUNS, str(VARIANTS.get(name)), devices_for(
            KNOWN[name][1], gpus, cores, cfg.run.target_device_option, cfg.run.draft_device_option))
        if setup in seen:  # on a GPU, "ar-1dev" is "ar" again: run it once
            print(f"amusd-viz bench: {name} runs exactly as {seen[setup]} here; skipped.",
                  file=sys.stderr)
            continue
        seen[setup] = name
        if KNOWN[name][2] and len(cfg.lookaheads) > 1:
            runs += [PlannedRun(f"{name}@{k}", name, k) for k in cfg.lookaheads]
        else:
            runs.append(PlannedRun(name, name, cfg.lookaheads[0]))
    return BenchPlan(cfg, runs, prompts, gpus, cores)


def _result(name: str, prompt: Prompt, repeat: int, gen, events, started: RunStarted) -> Result:
    s = _window_stats([started, *events], gen)
    commits = [e for e in events if e.type == "token_committed"]
    return Result(
        strategy=name, prompt_id=prompt.id, kind=prompt.kind, repeat=repeat,
        new_tokens=len(gen.token_ids), wall_s=gen.wall_s,
        ms_per_token=s.ms_per_token if s.ms_per_token is not None else 1000 * gen.wall_s,
        token_ids=gen.token_ids, mean_accepted_per_pass=s.mean_accepted_per_pass,
        acceptance_rate=s.acceptance_rate, acceptance_per_check=s.acceptance_per_check,
        expected_acceptance=s.expected_acceptance,
        busy=s.busy, overlap=s.overlap,
        curve=[e.t - gen.start_t for e in commits],
        tops=[[{"id": c.id, "logit": c.logit} for c in e.top] for e in commits]
        if name == "ar" else [], draft_lost=gen.draft_lost,
        target_passes=s.target_passes, solo_passes=s.solo_passes, lent_passes=s.lent_passes,
        drafts_per_verify=s.mean_drafts_per_verify, cache_hits=s.cache_hits,
        cache_misses=s.cache_misses, tree_hits=s.tree_hits, tree_tokens=s.tree_tokens,
        guessed_drafts=s.guessed_drafts, draft_passes=s.draft_passes,
        target_pass_ms=_ms(s.target_pass_s),
        draft_step_ms=_ms(s.draft_step_s),
        best_ms_per_token=None if s.best_ms_per_token is None else round(s.best_ms_per_token, 2))


def _with_speedups(out: dict, rows: list[Result]) -> dict:
    """Each strategy against ar, sync and sync-2dev (the paper's baseline, where it ran):
    pooled medians, and paired per prompt and repeat."""
    for ref in ("ar", "sync", "sync-2dev"):
        if ref == "sync-2dev" and ref not in out:
            continue
        base = out.get(ref, {}).get("median_ms_per_token")
        for name, row in out.items():
            row[f"speedup_vs_{ref}"] = round(base / row["median_ms_per_token"], 3) if base else None
            row[f"paired_vs_{ref}"] = paired_speedup(rows, name, ref)
    return out


def paired_speedup(rows: list[Result], name: str, ref: str) -> float | None:
    """The geometric mean, over the (prompt, repeat) pairs both strategies ran, of ref's
    ms/token over name's: each pair ran minutes apart at most, so this sees through the slow
    drifts of a shared machine that pooled medians mix in."""
    base = {(r.prompt_id, r.repeat): r.ms_per_token for r in rows if r.strategy == ref}
    ratios = [base[(r.prompt_id, r.repeat)] / r.ms_per_token for r in rows
              if r.strategy == name and (r.prompt_id, r.repeat) in base and r.ms_per_token > 0]
    if not ratios:
        return None
    return round(math.exp(statistics.mean(math.log(x) for x in ratios)), 3)


def _ms(secs: float | None) -> float | None:
    return None if secs is None else round(1000 * secs, 2)


def _started(config, run: PlannedRun, prompt_tokens: int) -> RunStarted:
    """What the statistics need to know of a run (the engine's events carry no run_started)."""
    return RunStarted(t=0.0, strategy=config.strategy, draft=config.draft_src,
                      target=config.target_src, draft_device=config.draft_device,
                      target_device=config.target_device, prompt_tokens=prompt_tokens,
                      lookahead=run.lookahead)


def _window_stats(events, gen) -> run_stats.RunStats:
    """Statistics over the generation window only (the engine's events carry no run_finished)."""
    closing = RunFinished(t=gen.end_t, new_tokens=len(gen.token_ids), wall_s=gen.wall_s,
                          started_at=gen.start_t)
    return run_stats.compute([*events, closing])


class _Runner:
    """Runs a plan: one engine per strategy and round, each warmed up on an untimed run."""

    def __init__(self, plan: BenchPlan, prepared, encoded: list[list[int]], bar) -> None:
        self.plan, self.prepared, self.encoded, self.bar = plan, prepared, encoded, bar
        self.engine: Engine | None = None
        self.results: list[Result] = []

    def engine_config(self, run: PlannedRun):
        from amusd_viz.engine.devices import (
            resolve_cuda_graphs,
            resolve_draft_quant,
            resolve_kv_cache,
        )
        from amusd_viz.engine.mps import resolve_share

        base = self.plan.cfg.run
        ngram = run.name in NGRAM_RUNS or base.ngram_n is not None
        kind = KNOWN[run.name][1]
        target_device, draft_device = devices_for("all" if ngram and kind == "two" else kind,
                                                  self.plan.gpus, self.plan.cores,
                                                  base.target_device_option,
                                                  base.draft_device_option)
        runs_on = draft_device or target_device
        run_cfg = base.model_copy(update={
            **VARIANTS.get(run.name, {}),
            "target_device": target_device, "draft_device": draft_device,
            "kv_cache": (kv := resolve_kv_cache(base.kv_cache_option, target_device)),
            "cuda_graphs": resolve_cuda_graphs(base.cuda_graphs_option, kv,
                                               (target_device, draft_device)),
            # MPS serves amusd's two workers on one GPU; every other run ignores the share
            "gpu_share": resolve_share(base.gpu_share_option, "amusd", target_device, draft_device)
            if run.engine_strategy == "amusd" and draft_device == target_device else None,
            "draft_quant": "none" if ngram else resolve_draft_quant(base.draft_quant_option,
                                                                      runs_on)})
        draft_src = (f"ngram:{DEFAULT_NGRAM_N}" if run.name in NGRAM_RUNS and base.ngram_n is None
                     else None)
        return self.prepared.engine_config(run_cfg, run.engine_strategy, draft_src)

    def one_strategy(self, run: PlannedRun, repeat: int) -> None:
        from amusd_viz.engine.session import Engine

        sink = EventList()
        max_new = self.plan.cfg.run.max_new_tokens
        eos = self.prepared.eos_ids
        self.bar.set_postfix_str(f"{run.label}: loading")
        self.engine = engine = Engine(self.engine_config(run), sink)
        engine.start()
        engine.wait_ready()
        self.bar.set_postfix_str(f"{run.label}: warm-up")
        engine.generate(self.encoded[0], min(16, max_new), run.lookahead, eos)
        for prompt, ids in zip(self.plan.prompts, self.encoded, strict=False):
            self.bar.set_postfix_str(f"{run.label}: {prompt.id}")
            sink.events = []
            gen = engine.generate(ids, max_new, run.lookahead, eos)
            self.results.append(_result(run.label, prompt, repeat, gen, sink.events,
                                        _started(engine.cfg, run, len(ids))))
            self.bar.update()
        engine.close()
        self.engine = None

    def rounds(self) -> str | None:
        """Every repeat restarts each strategy's engine; rounds go in A-B-B-A order, so the
        reversed order of odd rounds cancels a linear drift of the machine's speed (this VM's
        plain decoding speed wandered by ±15% between back-to-back runs). Returns why it stopped
        early: "interrupted" (the user), "failed" (a run failed), or None."""
        from amusd_viz.engine.session import RunCancelled
        from amusd_viz.errors import RunFailed

        runs = self.plan.runs
        try:
            for repeat in range(self.plan.cfg.repeats):
                for run in (runs if repeat % 2 == 0 else runs[::-1]):
                    self.one_strategy(run, repeat)
        except (KeyboardInterrupt, RunCancelled):
            print("\namusd-viz bench: interrupted; results so far:", file=sys.stderr)
            return "interrupted"
        except RunFailed as exc:  # a failed run loses nothing that ran before it
            print(f"\namusd-viz bench: a run failed ({exc}); results so far:", file=sys.stderr)
            return "failed"
        finally:
            if self.engine is not None:
                self.engine.close()
        return None


def bench_command(cfg: BenchConfig) -> int:
    from tqdm.auto import tqdm

    from amusd_viz.engine.devices import cuda_count, usable_cores
    from amusd_viz.engine.run import prepare

    gpus, cores = cuda_count(), usable_cores()
    plan = plan_runs(cfg, gpus, cores)
    if cfg.plot is not None:
        require_matplotlib()
    prepared = prepare(cfg.run)
    encoded = []
    for p in plan.prompts:
        ids = prepared.encode(p.prompt)
        prepared.check_length(ids, cfg.run.max_new_tokens)
        encoded.append(ids)
    print(f"amusd-viz bench: {len(plan.prompts)} prompts × {len(plan.runs)} strategies × "
          f"{cfg.repeats} repeat(s), {cfg.run.max_new_tokens} new tokens, {cfg.run.dtype}, draft "
          f"{prepared.draft} (quant: {cfg.run.draft_quant_option}), target {prepared.target}",
          file=sys.stderr)
    total = len(plan.prompts) * len(plan.runs) * cfg.repeats
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr) as bar:
        runner = _Runner(plan, prepared, encoded, bar)
        stopped = runner.rounds()
    report = build_report(runner.results, plan, prepared, stopped)
    bad = print_report(report)
    first = plan.prompts[0].id
    curves = {r.strategy: r.curve for r in runner.results if r.prompt_id == first and r.repeat == 0}
    write_outputs(report, cfg.json_out, cfg.plot, curves, first)
    return 130 if stopped == "interrupted" else (1 if bad or stopped else 0)


def build_report(results: list[Result], plan: BenchPlan, prepared, stopped: str | None) -> dict:
    from amusd_viz.eventlog import machine_info, package_versions

    cfg = plan.cfg
    labels = [run.label for run in plan.runs]
    overall = summarize(results, labels)
    return {
        "summary": overall["overall"],
        "by_kind": overall["by_kind"],
        "lossless": compare_with_ar(results, cfg.run.dtype, cfg.run.acceptance_rule,
                                    cfg.run.target_device_option
                                    or ("cuda:0" if plan.gpus else "cpu")),
        "settings": {"draft": prepared.draft, "target": prepared.target, "dtype": cfg.run.dtype,
                     "max_new_tokens": cfg.run.max_new_tokens, "lookahead": list(cfg.lookaheads),
                     "repeats": cfg.repeats, "prompts": len(plan.prompts),
                     "draft_quant": cfg.run.draft_quant_option,
                     "kv_cache": cfg.run.kv_cache_option,
                     "cuda_graphs": cfg.run.cuda_graphs_option,
                     "gpu_share": cfg.run.gpu_share_option,
                     "preamble_cache": cfg.run.preamble_cache,
                     "temperature": cfg.run.temperature, "top_p": cfg.run.top_p,
                     "top_k": cfg.run.top_k, "seed": cfg.run.seed,
                     "acceptance": cfg.run.acceptance_rule,
                     "strategies": {label: DESCRIPTIONS[label.split("@")[0]] for label in labels},
                     "interrupted": stopped is not None, "stopped": stopped},
        "machine": machine_info(),
        "packages": package_versions(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": [{k: v for k, v in r.__dict__.items() if k not in ("tops",)} for r in results],
    }
