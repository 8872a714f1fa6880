"""What the two AMUSD workers share: two token arrays in shared memory and two wake-up events.

- `committed`: written only by the target (the verified text); `committed_len`, `done`.
- `drafts`: written only by the draft (its whole sequence: committed prefix + proposals).
Each array has one writer, so it is guarded by a sequence counter instead of a lock (a seqlock):
the writer makes the counter odd, writes, makes it even; a reader retries a copy that overlapped a
write. Nobody ever waits on a lock the other process holds, so a worker killed mid-write cannot
block the survivor. The draft waits on `wakeup` (set by every commit) only when it has nothing
to do, looking every millisecond (never Event.wait: see `_poll`); the target reads whatever drafts
extend the committed text.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time

import numpy as np

from amusd_viz.engine.lending import CoreLoan
from amusd_viz.engine.tree import Bet, TreePath, bare_bets, within

COMMITTED_LEN, DRAFTS_LEN, DONE, EPOCH, DRAFT_ALIVE, DRAFT_STEP_US, COMMITTED_SEQ, DRAFTS_SEQ = range(8)


Q_SLOTS = 72  # q rows kept: more than the draft can run ahead (2 × the largest lookahead)
Q_SEQ, Q_POS, Q_TOKEN = range(3)

# The speculation cache's branches (engine/speccache.py), one slot each: a seqlock, a hash of
# the prefix the branch forks (prompt + generated tokens before its root), the root position
# (generated index), the token bet on there, how many drafts follow, then the drafts.
BRANCH_SLOTS, BRANCH_DEPTH = 4, 8
ALTS = 4  # the draft's other likely tokens kept beside each draft: bets for the target's tree
B_SEQ, B_HASH, B_ROOT, B_TOKEN, B_N = range(5)
B_WIDTH = 5 + BRANCH_DEPTH


def prefix_hash(tokens) -> int:
    """The same in every process (ints and tuples of ints hash without a random seed)."""
    return hash(tuple(tokens))


POLL_S = 0.001  # how often a waiting worker looks at an event


def _poll(event, timeout: float, stop=lambda: False) -> bool:
    """Wait for `event` by looking every millisecond (and at `stop()` every 20 ms) until
    `timeout`; True if it was set."""
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


class SharedState:
    def __init__(self, ctx: mp.context.BaseContext, capacity: int, one_device: bool = False,
                 vocab: int = 0, loan_core: int | None = None) -> None:
        self.capacity = capacity
        # amusd on two CPU cores: the target may borrow the resting draft's core (lending.py)
        self.loan = CoreLoan(ctx, loan_core) if loan_core is not None else None
        # Sampling: the draft's q row for each proposal, a ring indexed by position, each row
        # with its own seqlock and the (position, token) it belongs to. Only when sampling.
        self.vocab = vocab
        self._q = ctx.RawArray("f", Q_SLOTS * vocab) if vocab else None
        self._q_meta = ctx.RawArray("q", Q_SLOTS * 3) if vocab else None
        # Both workers on one device take turns: no thrashing, and the device's forward spans
        # never overlap. The lock guards each pass; the baton (two events) decides whose turn
        # it is: the draft drafts a batch, then the target reads and verifies it (read after the
        # turn is won, so it never verifies a stale, empty set of drafts), then the draft again.
        self.one_device = one_device
        self.device_lock = ctx.Lock() if one_device else None
        self._turn = {"target": ctx.Event(), "draft": ctx.Event()} if one_device else {}
        self.wakeup = ctx.Event()  # set by every commit: the draft may have work
        self.drafted = ctx.Event()  # set by every draft publish: the target may have work
        self._committed = ctx.RawArray("q", capacity)
        self._drafts = ctx.RawArray("q", capacity)
        # the draft's other likely tokens beside each draft (bets the target checks in its tree
        # passes), -1 for none; no lock: a stale bet only wastes a row of the target's pass,
        # which commits nothing it did not pick itself
        self._alts = ctx.RawArray("q", capacity * ALTS)
        self._meta = ctx.RawArray("q", 8)  # indexed by the constants above
        self._branches = ctx.RawArray("q", BRANCH_SLOTS * B_WIDTH)
        # sampling: each branch draft's q row (the target needs q to judge it)
        self._branch_q = ctx.RawArray("f", BRANCH_SLOTS * BRANCH_DEPTH * vocab) if vocab else None

    # numpy views are made lazily in each process (RawArrays pickle, views do not)
    def _view(self, raw) -> np.ndarray:
        return np.frombuffer(raw, dtype=np.int64)

    def reset(self) -> None:
        """Between runs, while no worker writes."""
        meta = self._view(self._meta)
        meta[COMMITTED_LEN] = meta[DRAFTS_LEN] = meta[DONE] = 0
        meta[EPOCH] += 1
        self.clear_branches()
        self._view(self._alts)[:] = -1
        self.wakeup.clear()
        self.drafted.clear()
        if self.loan is not None:
            self.loan.reset()
        if self._turn:  # the target goes first: its prefill
            self._turn["draft"].clear()
            self._turn["target"].set()

    def _write(self, counter: int, write) -> None:
        meta = self._view(self._meta)
        meta[counter] += 1  # odd: a write is under way
        write(meta)
        meta[counter] += 1

    def _read(self, counter: int, read, patience_s: float = 1.0):
        """A consistent copy, or None if the writer stayed mid-write (it died there)."""
        meta = self._view(self._meta)
        deadline = time.monotonic() + patience_s
        while True:
            before = int(meta[counter])
            if before % 2 == 0:
                out = read(meta)
                if int(meta[counter]) == before:
                    return out
            if time.monotonic() > deadline:
                return None
            time.sleep(0)

    @contextlib.contextmanager
    def device_turn(self):
        """Both workers on one device: one forward pass at a time. A draft that died holding
        the turn does not block the target."""
        if self.device_lock is None:
            yield
            return
        # liveness first: a dead draft may hold the lock for good (checked every 20 ms, not
        # after a long timeout per pass)
        while not (acquired := self.device_lock.acquire(timeout=0.02)):
            if not self.draft_alive:
                break
        try:
            yield
        finally:
            if acquired:
                self.device_lock.release()

    def wait_turn(self, role: str, stop=lambda: False) -> None:
        """One device: block until `role` holds the baton, or `stop()` (checked every 20 ms:
        the run ended, or the other worker is gone). No-op on two devices."""
        if not self._turn:
            return
        # Polled, never Event.wait: a process killed while sleeping in wait() stays counted as
        # a sleeper of the event's Condition, and the other side's next set() then waits
        # forever for it to wake (multiprocessing's notify has no timeout)
        if not _poll(self._turn[role], 3600.0, stop):
            return
        self._turn[role].clear()

    def pass_turn(self, to: str) -> None:
        if self._turn:
            self._turn[to].set()

    def set_draft_alive(self, alive: bool) -> None:
        self._view(self._meta)[DRAFT_ALIVE] = int(alive)
        self.drafted.set()  # a waiting target must not wait for a draft that is gone

    @property
    def run_done(self) -> bool:
        return bool(self._view(self._meta)[DONE])

    @property
    def draft_alive(self) -> bool:
        return bool(self._view(self._meta)[DRAFT_ALIVE])

    def draft_step_s(self) -> float:
        return self._view(self._meta)[DRAFT_STEP_US] / 1e6

    def _check(self, n: int) -> None:
        if n > self.capacity:
            raise ValueError(f"sequence of {n} tokens exceeds the shared capacity {self.capacity}")

    # target side ------------------------------------------------------------------------------
    def publish_committed(self, seq: list[int], n_prompt: int, done: bool) -> None:
        self._check(len(seq))

        def write(meta):
            self._view(self._committed)[n_prompt:len(seq)] = seq[n_prompt:]
            meta[COMMITTED_LEN] = len(seq)
            meta[DONE] = int(done)

        self._write(COMMITTED_SEQ, write)
        if self.draft_alive:
            self.wakeup.set()

    def read_drafts(self, committed: list[int], n_prompt: int, limit: int) -> list[int]:
        """Draft tokens that extend `committed`, at most `limit`; none while the draft still
        holds a sequence that disagrees with the committed text (before its rollback)."""
        if limit <= 0 or not self.draft_alive:
            return []
        n = len(committed)

        def read(meta):
            length = int(meta[DRAFTS_LEN])
            return self._view(self._drafts)[n_prompt:min(length, n + limit)].copy() if length > n else None

        snapshot = self._read(DRAFTS_SEQ, read, patience_s=0.05)
        if snapshot is None or snapshot[: n - n_prompt].tolist() != committed[n_prompt:]:
            return []
        return snapshot[n - n_prompt:].tolist()

    # draft side -------------------------------------------------------------------------------
    def publish_drafts(self, seq: list[int], n_prompt: int, step_s: float | None = None) -> None:
        self._check(len(seq))

        def write(meta):
            self._view(self._drafts)[n_prompt:len(seq)] = seq[n_prompt:]
            meta[DRAFTS_LEN] = len(seq)

        self._write(DRAFTS_SEQ, write)
        if step_s is not None:  # a moving average of the draft's step time
            meta = self._view(self._meta)
            old = meta[DRAFT_STEP_US]
            meta[DRAFT_STEP_US] = int(0.8 * old + 0.2 * step_s * 1e6) if old else int(step_s * 1e6)
        self.drafted.set()

    def write_alts(self, index: int, tokens: list[int]) -> None:
        """The draft's likeliest other tokens at sequence index `index`, likeliest first
        (written before that draft is published)."""
        row = self._view(self._alts).reshape(-1, ALTS)[index]
        row[:] = -1
        row[:min(ALTS, len(tokens))] = tokens[:ALTS]

    def wait_for_drafts(self, committed: list[int], n_prompt: int, limit: int, want: int,
                        timeout: float) -> list[int]:
        """Drafts extending `committed`: blocks (never spins) until `want` of them exist, the
        timeout passes, or the draft is gone; returns what is there then."""
        deadline = time.monotonic() + timeout
        while True:
            self.drafted.clear()
            drafts = self.read_drafts(committed, n_prompt, limit)
            left = deadline - time.monotonic()
            if len(drafts) >= want or left <= 0 or not self.draft_alive:
                return drafts
            self.drafted.wait(left)

    def read_committed(self, prompt: list[int]) -> tuple[list[int], bool]:
        """The committed sequence (prompt included) and whether the run is over. Only the
        generated part is copied: the prompt never changes."""
        n_prompt = len(prompt)

        def read(meta):
            n = int(meta[COMMITTED_LEN])
            generated = self._view(self._committed)[n_prompt:n].tolist() if n else []
            return generated, bool(meta[DONE])

        got = self._read(COMMITTED_SEQ, read)
        if got is None:  # the target died mid-write: the run is over for us
            return list(prompt), True
        generated, done = got
        return prompt + generated, done

    def clear_wakeup(self) -> None:
        self.wakeup.clear()

    def wait_wakeup(self, timeout: float) -> None:
        _poll(self.wakeup, timeout)  # polled: see wait_turn

    # sampling: the draft's q rows --------------------------------------------------------------
    def write_q_row(self, pos: int, token: int, q) -> None:
        """The draft's distribution at `pos` (generated index) for its proposal `token`."""
        assert self._q is not None and self._q_meta is not None
        slot = pos % Q_SLOTS
        meta = self._view(self._q_meta).reshape(Q_SLOTS, 3)[slot]
        rows = np.frombuffer(self._q, dtype=np.float32).reshape(Q_SLOTS, self.vocab)
        meta[Q_SEQ] += 1  # odd: a write is under way
        rows[slot] = q.numpy()
        meta[Q_POS], meta[Q_TOKEN] = pos, token
        meta[Q_SEQ] += 1

    def read_q_rows(self, start_pos: int, drafts: list[int]) -> list:
        """q rows for drafts at start_pos, start_pos+1, ...: a consistent copy of each, up to
        the first row that belongs to another proposal (a rollback rewrote it)."""
        import torch

        assert self._q is not None and self._q_meta is not None
        metas = self._view(self._q_meta).reshape(Q_SLOTS, 3)
        rows = np.frombuffer(self._q, dtype=np.float32).reshape(Q_SLOTS, self.vocab)
        out = []
        for i, token in enumerate(drafts):
            meta = metas[(start_pos + i) % Q_SLOTS]
            before = int(meta[Q_SEQ])
            row = rows[(start_pos + i) % Q_SLOTS].copy()
            if (before % 2 or int(meta[Q_SEQ]) != before or int(meta[Q_POS]) != start_pos + i
                    or int(meta[Q_TOKEN]) != token):
                break
            out.append(torch.from_numpy(row))
        return out

    # the speculation cache's branches ----------------------------------------------------------
    def _branch_rows(self) -> np.ndarray:
        return self._view(self._branches).reshape(BRANCH_SLOTS, B_WIDTH)

    def _branch_q_rows(self) -> np.ndarray:
        assert self._branch_q is not None
        return np.frombuffer(self._branch_q, dtype=np.float32).reshape(
            BRANCH_SLOTS, BRANCH_DEPTH, self.vocab)

    def publish_branch(self, slot: int, hashed: int, root: int, token: int,
                       drafts: list[int], last_q=None) -> None:
        """Draft side: branch `slot` bets on `token` at generated position `root` after a
        prefix with hash `hashed`, and drafted `drafts` after it; sampling: `last_q` is the q
        row of the last of them (the earlier ones were written with their own drafts)."""
        row = self._branch_rows()[slot]
        drafts = drafts[:BRANCH_DEPTH]
        row[B_SEQ] += 1  # odd: a write is under way
        row[B_HASH], row[B_ROOT], row[B_TOKEN], row[B_N] = hashed, root, token, len(drafts)
        row[5:5 + len(drafts)] = drafts
        if last_q is not None and self._branch_q is not None:
            self._branch_q_rows()[slot, len(drafts) - 1] = last_q.numpy()
        row[B_SEQ] += 1

    def clear_branch(self, slot: int) -> None:
        row = self._branch_rows()[slot]
        row[B_SEQ] += 1
        row[B_N] = -1  # empty
        row[B_SEQ] += 1

    def clear_branches(self) -> None:
        for slot in range(BRANCH_SLOTS):
            self.clear_branch(slot)

    def _branch_snapshots(self) -> list[tuple[int, int, int, list[int], np.ndarray | None]]:
        """Target side: a consistent copy of every published branch (seqlock), as
        (prefix hash, root, token, drafts, q rows or None)."""
        out = []
        for slot, row in enumerate(self._branch_rows()):
            before = int(row[B_SEQ])
            if before % 2:
                continue
            snap = row.copy()
            q_rows = self._branch_q_rows()[slot].copy() if self._branch_q is not None else None
            if int(row[B_SEQ]) != before or snap[B_N] <= 0:
                continue
            out.append((int(snap[B_HASH]), int(snap[B_ROOT]), int(snap[B_TOKEN]),
                        snap[5:5 + int(snap[B_N])].tolist(), q_rows))
        return out

    def read_branch_drafts(self, committed: list[int], n_prompt: int,
                           limit: int) -> tuple[list[int], list]:
        """Target side: drafts from a branch whose bet the committed text has just confirmed
        (its prefix, then its token), and (sampling) their q rows; ([], []) when none has."""
        if limit <= 0 or not self.draft_alive:
            return [], []
        for hashed, root, token, drafts, q_rows in self._branch_snapshots():
            cut = n_prompt + root
            if len(committed) <= cut or committed[cut] != token:
                continue
            line = [*committed[:cut + 1], *drafts]
            if line[:len(committed)] != committed or len(line) <= len(committed):
                continue
            if prefix_hash(committed[:cut]) != hashed:
                continue
            first = len(committed) - (cut + 1)  # index of the first draft still to judge
            out = line[len(committed):len(committed) + limit]
            return out, _q_list(q_rows, first, len(out))
        return [], []

    def read_tree_paths(self, committed: list[int], n_prompt: int, drafts: list[int],
                        budget: int) -> list[TreePath]:
        """Target side: the bets that leave the line committed + drafts at one of the drafts
        (the target rejects that draft and picks the bet's token instead): the published
        branches, then the draft's other likely tokens beside each draft; the likeliest within
        `budget` tokens (engine/tree.py)."""
        if budget <= 0 or not drafts or not self.draft_alive:
            return []
        line = [*committed, *drafts]
        found = []
        for hashed, root, token, branch_drafts, q_rows in self._branch_snapshots():
            anchor = n_prompt + root
            if not len(committed) <= anchor < len(line) or line[anchor] == token:
                continue
            if prefix_hash(line[:anchor]) != hashed:
                continue
            q_list = _q_list(q_rows, 0, len(branch_drafts))
            found.append(Bet(0, TreePath(anchor, token, branch_drafts, q_list)))
        # the sibling branch of the last draft comes only with the draft's next step; its
        # runner-up alone is a bet meanwhile
        others = self._view(self._alts).reshape(-1, ALTS)[len(committed):len(line)].tolist()
        taken = {(b.path.anchor, b.path.token) for b in found}
        return within([*found, *bare_bets(len(committed), drafts, others, taken)], budget)


def _q_list(q_rows: np.ndarray | None, first: int, n: int) -> list:
    if q_rows is None:
        return []
    import torch

    return [torch.from_numpy(q_rows[first + i]) for i in range(n)]
