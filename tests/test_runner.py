"""The runner's KV-cache bookkeeping on a tiny float32 model, for the dynamic cache and the static
one (`--kv-cache static`: preallocated lines, rollback = the pointer moving back; a short first
line here, so the tests also cross its growth): the preamble fed at load time is reused by every
run, whatever the run before it fed, and changes no logits; tree passes leave nothing behind."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from amusd_viz.engine.runner import Runner, common_prefix
from amusd_viz.engine.static_runner import StaticRunner


@pytest.fixture(scope="module")
def model(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["target"], dtype=torch.float32).eval()


BUCKETS = (2, 3, 10)  # small fixed pass sizes: these tests pad, chunk and fall back to exact


@pytest.fixture(params=["dynamic", "static", "static-buckets"])
def make(request):
    """The runner under test; the reference it is checked against is always a fresh dynamic
    Runner. The static ones start with an 8-token line, so passes grow it; with buckets, every
    pass is padded to 2, 3 or 10 tokens (a CUDA graph's fixed sizes), a longer one chunked."""
    if request.param == "dynamic":
        return lambda model: Runner(model, "cpu")
    buckets = BUCKETS if request.param == "static-buckets" else ()
    return lambda model: StaticRunner(model, "cpu", line_tokens=8, buckets=buckets)


def test_runs_start_from_the_cached_preamble(model, make):
    runner, fresh = make(model), Runner(model, "cpu")
    runner.set_preamble([3, 4, 5, 6])
    for prompt in ([3, 4, 5, 6, 20, 21], [9, 3, 4], [3, 4, 5, 6, 30, 31, 32], [3, 4, 5]):
        runner.begin()
        fresh.reset()
        logits, fed, _, _ = runner.forward(prompt, 2)
        expected, _, _, _ = fresh.forward(prompt, 2)
        reused = min(common_prefix(prompt, [3, 4, 5, 6]), len(prompt) - 2)  # 2 logits wanted
        assert fed == len(prompt) - reused
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        runner.forward(prompt + [7, 8], 1)  # the run goes on past the prompt
    runner.begin()
    assert runner.ids == [3, 4, 5, 6] and runner.cache.get_seq_length() == 4


def test_without_a_preamble_every_run_starts_empty(model, make):
    runner = make(model)
    runner.set_preamble([])
    runner.forward([1, 2, 3], 1)
    runner.begin()
    assert runner.ids == [] and runner.cache.get_seq_length() == 0


def assert_holds_only(runner, model, seq):
    """The cache holds seq and nothing else: the next pass equals a fresh runner's."""
    assert runner.ids == seq and runner.cache.get_seq_length() == len(seq)
    after, _, _, _ = runner.forward([*seq, 70], 1)
    expected, _, _, _ = Runner(model, "cpu").forward([*seq, 70], 1)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cached", [0, 3, 6])  # tokens already in the cache: 0, some, all but one
def test_a_sibling_gets_its_own_logits_in_the_same_pass_and_leaves_no_trace(model, make, attn,
                                                                           cached):
    """forward(seq, paths=[(len(seq) - 1, [s])]) (a sibling) returns seq's next-token logits and, as one more row, those of
    seq[:-1] + [s]: each equal to a pass of its own; the cache then holds seq only (the next
    pass matches a fresh runner's)."""
    model.config._attn_implementation = attn
    try:
        seq, sibling = [5, 9, 12, 40, 41, 7, 33], 60
        runner = make(model)
        if cached:
            runner.forward(seq[:cached], 1)
        logits, fed, _, _ = runner.forward(seq, 1, paths=[(len(seq) - 1, [sibling])])
        assert fed == len(seq) - cached and logits.shape[0] == 2
        alone, _, _, _ = Runner(model, "cpu").forward(seq, 1)
        beside, _, _, _ = Runner(model, "cpu").forward([*seq[:-1], sibling], 1)
        torch.testing.assert_close(logits[0], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[1], beside[0], rtol=1e-5, atol=1e-5)
        assert_holds_only(runner, model, seq)
    finally:
        model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cached", [0, 2, 5])  # before both anchors, between them, past one
def test_paths_get_the_logits_of_their_own_lines_in_one_pass(model, make, attn, cached):
    """forward(seq, n, paths=...) returns seq's last n rows, then one row per path token, each
    equal to a pass over the path's own line (seq[:anchor] + the path up to that token); the
    pass leaves seq alone in the cache."""
    model.config._attn_implementation = attn
    try:
        seq = [5, 9, 12, 40, 41, 7, 33]
        paths = [(3, [60, 61, 62]), (6, [70]), (4, [80, 81])]
        runner = make(model)
        if cached:
            runner.forward(seq[:cached], 1)
        logits, fed, _, _ = runner.forward(seq, 3, paths=paths)
        assert fed == len(seq) - min(cached, len(seq) - 3) and logits.shape[0] == 3 + 6
        alone, _, _, _ = Runner(model, "cpu").forward(seq, 3)
        torch.testing.assert_close(logits[:3], alone, rtol=1e-5, atol=1e-5)
        row = 3
        for anchor, tokens in paths:
            line = [*seq[:anchor], *tokens]
            own, _, _, _ = Runner(model, "cpu").forward(line, len(tokens))
            torch.testing.assert_close(logits[row:row + len(tokens)], own, rtol=1e-5, atol=1e-5)
            row += len(tokens)
        assert_holds_only(runner, model, seq)
    finally:
        model.config._attn_implementation = "sdpa"


def test_static_rollback_moves_the_pointer_and_keeps_the_line(model):
    """Cropping a static line moves its pointer back and allocates nothing: the same tensors
    hold the next pass, whose stale slots past the pointer are overwritten, and its logits are
    a fresh runner's."""
    runner = StaticRunner(model, "cpu", line_tokens=64)
    seq = [5, 9, 12, 40, 41, 7, 33, 20, 21]
    runner.forward(seq, 1)
    keys = runner.cache.layers[0].keys
    runner.crop(4)
    assert int(runner.cache.get_seq_length()) == 4 and runner.ids == seq[:4]
    other = [*seq[:4], 90, 91, 92]
    logits, fed, _, _ = runner.forward(other, 2)
    expected, _, _, _ = Runner(model, "cpu").forward(other, 2)
    assert fed == 3 and runner.cache.layers[0].keys is keys
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_static_forks_are_independent_and_their_lines_are_reused(model):
    """A fork copies the prefix into a line of its own: feeding either leaves the other's
    logits as a fresh runner's. A released fork's line serves the next fork; adopting a fork
    copies its slots into the main line (which keeps its tensors) and hands the fork's line to
    the pool."""
    main = StaticRunner(model, "cpu", line_tokens=32)
    seq = [5, 9, 12, 40, 41, 7]
    main.forward(seq, 1)
    branch = main.fork()
    assert branch.cache is not main.cache
    branch.forward([*seq, 60, 61], 1)
    main.forward([*seq, 70], 1)
    for runner, line in ((main, [*seq, 70, 71]), (branch, [*seq, 60, 61, 62])):
        got, _, _, _ = runner.forward(line, 2)
        expected, _, _, _ = Runner(model, "cpu").forward(line, 2)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    line = branch.cache
    branch.release()
    assert branch.cache is None and main.fork().cache is line  # reused, not allocated
    taken = main.fork()
    taken.forward([*seq, 80, 81, 82], 1)
    main.forward([*seq, 70, 71, 72, 73], 1)  # past where the branch parts: overwritten below
    line, keys = taken.cache, main.cache.layers[0].keys
    main.adopt(taken)
    assert main.ids == [*seq, 80, 81, 82] and taken.cache is None
    assert main.cache.layers[0].keys is keys and main.fork().cache is line
    got, _, _, _ = main.forward([*seq, 80, 81, 82, 83], 2)
    expected, _, _, _ = Runner(model, "cpu").forward([*seq, 80, 81, 82, 83], 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fixed_size_passes_pad_and_chunk_without_changing_logits(model, attn):
    """Passes padded to a bucket and a prefill chunked through the largest give a fresh
    runner's logits; the padding leaves the pointer where the real tokens end."""
    model.config._attn_implementation = attn
    try:
        runner = StaticRunner(model, "cpu", line_tokens=64, buckets=BUCKETS)
        seq = list(range(3, 40))
        for line, n in ((seq, 3), ([*seq, 50], 1), ([*seq[:20], 60, 61], 2)):
            got, fed, _, _ = runner.forward(line, n)
            expected, _, _, _ = Runner(model, "cpu").forward(line, n)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert int(runner.cache.get_seq_length()) == len(line) == len(runner.ids)
    finally:
        model.config._attn_implementation = "sdpa"
