"""What the two AMUSD workers share: plain transport in shared memory, no policy.

- `committed`: written only by the target (the verified text); its length, `done`.
- `drafts`: written only by the draft (its whole sequence: committed prefix + proposals), with
  the draft's other likely tokens beside each draft (`alts`) and, when sampling, each draft's q
  row (a ring by position).
- `branches`: the speculation cache's table (engine/speccache.py), one row per branch.

Every record has one writer, so it is guarded by a sequence counter instead of a lock (a seqlock,
`writing` / `consistent`): the writer makes the counter odd, writes, makes it even; a reader
retries a copy that overlapped a write. Nobody ever waits on a lock the other process holds, so a
worker killed mid-write cannot block the survivor. The draft waits on `wakeup` (set by every
commit) only when it has nothing to do, looking every millisecond (never Event.wait: see `poll`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from typing import NamedTuple

import numpy as np

COMMITTED_LEN, DRAFTS_LEN, DONE, EPOCH, DRAFT_ALIVE, COMMITTED_SEQ, DRAFTS_SEQ = range(7)

Q_SLOTS = 72  # q rows kept: more than the draft can run ahead (2 × the largest lookahead)
Q_SEQ, Q_POS, Q_TOKEN = range(3)

# The speculation cache's branches, one row each: a seqlock, a hash of the prefix the branch
# forks (prompt + generated tokens before its root), the root position (generated index), the
# token bet on there, how many drafts follow, then the drafts.
BRANCH_SLOTS, BRANCH_DEPTH = 4, 8
ALTS = 4  # the draft's other likely tokens kept beside each draft: bets for the target's tree
B_SEQ, B_HASH, B_ROOT, B_TOKEN, B_N = range(5)
B_WIDTH = 5 + BRANCH_DEPTH

POLL_S = 0.001  # how often a waiting worker looks at an event


class BranchSnapshot(NamedTuple):
    prefix_hash: int
    root: int  # generated position the branch bets on
    token: int  # the token bet on there
    drafts: list[int]
    q_rows: np.ndarray | None  # sampling: [BRANCH_DEPTH, vocab]


def prefix_hash(tokens) -> int:
    """The same in every process (ints and tuples of ints hash without a random seed)."""
    return hash(tuple(tokens))


def poll(event, timeout: float, stop=lambda: False) -> bool:
    """Wait for `event` by looking every millisecond (and at `stop()` every 20 ms) until
    `timeout`; True if it was set. Never Event.wait: a process killed while sleeping in wait()
    stays counted as a sleeper of the event's Condition, and the other side's next set() then
    waits forever for it to wake (multiprocessing's notify has no timeout)."""
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 0.02
    while not event.is_set():
        now = time.monotonic()
        if now >= deadline:
            return False
        if now >= next_check:
            if stop():
                return False
            next_check = now + 0.02
        time.sleep(POLL_S)
    return True


@contextlib.contextmanager
def writing(counters: np.ndarray, i: int):
    """The writer's side of a seqlock: counters[i] is odd while the record is written."""
    counters[i] += 1
    try:
        yield
    finally:
        counters[i] += 1


def consistent(counters: np.ndarray, i: int, read, patience_s: float = 0.0):
    """The reader's side: `read()` taken while counters[i] was even and unchanged, retried for
    up to `patience_s` (0: one try); None if no copy was consistent (a writer that died
    mid-write stays odd for good)."""
    deadline = time.monotonic() + patience_s
    while True:
        before = int(counters[i])
        if before % 2 == 0:
            out = read()
            if int(counters[i]) == before:
                return out
        if time.monotonic() >= deadline:
            return None
        time.sleep(0)


class SharedState:
    def __init__(self, ctx: mp.context.BaseContext, capacity: int, vocab: int = 0) -> None:
        self.capacity = capacity
        self.vocab = vocab  # sampling: the width of q rows (0: greedy, no q rows)
        self.wakeup = ctx.Event()  # set by every commit: the draft may have work
        self._meta = ctx.RawArray("q", 8)  # indexed by the constants above
        self._committed = ctx.RawArray("q", capacity)
        self._drafts = ctx.RawArray("q", capacity)
        # -1 for none; no seqlock: a stale bet only wastes a row of the target's pass, which
        # commits nothing it did not pick itself
        self._alts = ctx.RawArray("q", capacity * ALTS)
        self._q = ctx.RawArray("f", Q_SLOTS * vocab) if vocab else None
        self._q_meta = ctx.RawArray("q", Q_SLOTS * 3) if vocab else None
        self._branches = ctx.RawArray("q", BRANCH_SLOTS * B_WIDTH)
        self._branch_q = ctx.RawArray("f", BRANCH_SLOTS * BRANCH_DEPTH * vocab) if vocab else None

    # numpy views are made lazily in each process (RawArrays pickle, views do not)
    @staticmethod
    def _ints(raw) -> np.ndarray:
        return np.frombuffer(raw, dtype=np.int64)

    @property
    def meta(self) -> np.ndarray:
        return self._ints(self._meta)

    def reset(self) -> None:
        """Between runs, while no worker writes."""
        self.meta[[COMMITTED_LEN, DRAFTS_LEN, DONE]] = 0
        self.meta[EPOCH] += 1
        for slot in range(BRANCH_SLOTS):
            self.clear_branch(slot)
        self._ints(self._alts)[:] = -1
        self.wakeup.clear()

    def set_draft_alive(self, alive: bool) -> None:
        self.meta[DRAFT_ALIVE] = int(alive)

    @property
    def run_done(self) -> bool:
        return bool(self.meta[DONE])

    @property
    def draft_alive(self) -> bool:
        return bool(self.meta[DRAFT_ALIVE])

    def _check(self, n: int) -> None:
        if n > self.capacity:
            raise ValueError(f"sequence of {n} tokens exceeds the shared capacity {self.capacity}")

    # the committed text (the target writes) ----------------------------------------------------
    def publish_committed(self, seq: list[int], n_prompt: int, done: bool) -> None:
        self._check(len(seq))
        with writing(self.meta, COMMITTED_SEQ):
            self._ints(self._committed)[n_prompt:len(seq)] = seq[n_prompt:]
            self.meta[COMMITTED_LEN] = len(seq)
            self.meta[DONE] = int(done)
        if self.draft_alive:
            self.wakeup.set()

    def read_committed(self, prompt: list[int]) -> tuple[list[int], bool]:
        """The committed sequence (prompt included) and whether the run is over. Only the
        generated part is copied: the prompt never changes."""
        n_prompt, meta = len(prompt), self.meta

        def read():
            n = int(meta[COMMITTED_LEN])
            generated = self._ints(self._committed)[n_prompt:n].tolist() if n else []
            return generated, bool(meta[DONE])

        got = consistent(meta, COMMITTED_SEQ, read, patience_s=1.0)
        if got is None:  # the target died mid-write: the run is over for us
            return list(prompt), True
        return prompt + got[0], got[1]

    def clear_wakeup(self) -> None:
        self.wakeup.clear()

    def wait_wakeup(self, timeout: float) -> None:
        poll(self.wakeup, timeout)

    # the draft's line (the draft writes) -------------------------------------------------------
    def publish_drafts(self, seq: list[int], n_prompt: int) -> None:
        self._check(len(seq))
        with writing(self.meta, DRAFTS_SEQ):
            self._ints(self._drafts)[n_prompt:len(seq)] = seq[n_prompt:]
            self.meta[DRAFTS_LEN] = len(seq)

    def read_drafts(self, committed: list[int], n_prompt: int, limit: int) -> list[int]:
        """Draft tokens that extend `committed`, at most `limit`; none while the draft still
        holds a sequence that disagrees with the committed text (before its rollback)."""
        if limit <= 0 or not self.draft_alive:
            return []
        n, meta = len(committed), self.meta

        def read():
            length = int(meta[DRAFTS_LEN])
            return (self._ints(self._drafts)[n_prompt:min(length, n + limit)].copy()
                    if length > n else None)

        snapshot = consistent(meta, DRAFTS_SEQ, read, patience_s=0.05)
        if snapshot is None or snapshot[: n - n_prompt].tolist() != committed[n_prompt:]:
            return []
        return snapshot[n - n_prompt:].tolist()

    def write_alts(self, index: int, tokens: list[int]) -> None:
        """The draft's likeliest other tokens at sequence index `index`, likeliest first
        (written before that draft is published)."""
        row = self._ints(self._alts).reshape(-1, ALTS)[index]
        row[:] = -1
        row[:min(ALTS, len(tokens))] = tokens[:ALTS]

    def read_alts(self, start: int, stop: int) -> list[list[int]]:
        return self._ints(self._alts).reshape(-1, ALTS)[start:stop].tolist()

    # sampling: the draft's q rows --------------------------------------------------------------
    def _q_views(self) -> tuple[np.ndarray, np.ndarray]:
        assert self._q is not None and self._q_meta is not None
        return (self._ints(self._q_meta).reshape(Q_SLOTS, 3),
                np.frombuffer(self._q, dtype=np.float32).reshape(Q_SLOTS, self.vocab))

    def write_q_row(self, pos: int, token: int, q) -> None:
        """The draft's distribution at `pos` (generated index) for its proposal `token`."""
        metas, rows = self._q_views()
        slot = pos % Q_SLOTS
        with writing(metas[slot], Q_SEQ):
            rows[slot] = q.numpy()
            metas[slot, Q_POS], metas[slot, Q_TOKEN] = pos, token

    def read_q_rows(self, start_pos: int, drafts: list[int]) -> list:
        """q rows for drafts at start_pos, start_pos+1, ...: a consistent copy of each, up to
        the first row that belongs to another proposal (a rollback rewrote it)."""
        import torch

        metas, rows = self._q_views()
        out = []
        for i, token in enumerate(drafts):
            slot = (start_pos + i) % Q_SLOTS
            got = consistent(metas[slot], Q_SEQ, lambda s=slot: (rows[s].copy(), *metas[s, 1:]))
            if got is None or (got[1], got[2]) != (start_pos + i, token):
                break
            out.append(torch.from_numpy(got[0]))
        return out

    # the speculation cache's branches ----------------------------------------------------------
    def _branch_rows(self) -> np.ndarray:
        return self._ints(self._branches).reshape(BRANCH_SLOTS, B_WIDTH)

    def _branch_q_rows(self) -> np.ndarray | None:
        if self._branch_q is None:
            return None
        return np.frombuffer(self._branch_q, dtype=np.float32).reshape(
            BRANCH_SLOTS, BRANCH_DEPTH, self.vocab)

    def publish_branch(self, slot: int, hashed: int, root: int, token: int,
                       drafts: list[int], last_q=None) -> None:
        """Branch `slot` bets on `token` at generated position `root` after a prefix with hash
        `hashed`, and drafted `drafts` after it; sampling: `last_q` is the q row of the last of
        them (the earlier ones were written with their own drafts)."""
        row, q_rows = self._branch_rows()[slot], self._branch_q_rows()
        drafts = drafts[:BRANCH_DEPTH]
        with writing(row, B_SEQ):
            row[B_HASH], row[B_ROOT], row[B_TOKEN], row[B_N] = hashed, root, token, len(drafts)
            row[5:5 + len(drafts)] = drafts
            if last_q is not None and q_rows is not None:
                q_rows[slot, len(drafts) - 1] = last_q.numpy()

    def clear_branch(self, slot: int) -> None:
        row = self._branch_rows()[slot]
        with writing(row, B_SEQ):
            row[B_N] = -1  # empty

    def branches(self) -> list[BranchSnapshot]:
        """A consistent copy of every published branch (none once the draft is gone)."""
        if not self.draft_alive:
            return []
        out = []
        q_all = self._branch_q_rows()
        for slot, row in enumerate(self._branch_rows()):
            got = consistent(row, B_SEQ, lambda r=row, s=slot: (
                r.copy(), q_all[s].copy() if q_all is not None else None))
            if got is None or got[0][B_N] <= 0:
                continue
            snap, q_rows = got
            out.append(BranchSnapshot(int(snap[B_HASH]), int(snap[B_ROOT]), int(snap[B_TOKEN]),
                                      snap[5:5 + int(snap[B_N])].tolist(), q_rows))
        return out


def q_list(q_rows: np.ndarray | None, first: int, n: int) -> list:
    """Rows first .. first + n of a branch's q rows, as tensors (none when greedy)."""
    if q_rows is None:
        return []
    import torch

    return [torch.from_numpy(q_rows[first + i]) for i in range(n)]
