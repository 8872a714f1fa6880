"""What the two AMUSD workers share: two token arrays in shared memory and one wake-up event.

- `committed`: written only by the target (the verified text); `committed_len`, `done`.
- `drafts`: written only by the draft (its whole sequence: committed prefix + proposals).
One lock guards both arrays for the microseconds of a copy; the draft blocks on `wakeup` (set by
every commit) only when it has nothing to do, so no core spins. The target never blocks on the
draft: it reads whatever drafts extend the committed text at the start of each pass.
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np


class SharedState:
    def __init__(self, ctx: mp.context.BaseContext, capacity: int, one_device: bool = False) -> None:
        self.capacity = capacity
        self.lock = ctx.Lock()
        # Both workers on one device take turns, pass by pass: no thrashing, and the device's
        # forward spans never overlap.
        self.device_lock = ctx.Lock() if one_device else None
        self.wakeup = ctx.Event()  # set by every commit: the draft may have work
        self.drafted = ctx.Event()  # set by every draft publish: the target may have work
        self._committed = ctx.RawArray("q", capacity)
        self._drafts = ctx.RawArray("q", capacity)
        # [committed_len, drafts_len, done, epoch, draft_alive, draft_step_us]
        self._meta = ctx.RawArray("q", 6)

    # numpy views are made lazily in each process (RawArrays pickle, views do not)
    def _view(self, raw) -> np.ndarray:
        return np.frombuffer(raw, dtype=np.int64)

    def reset(self) -> None:
        with self.lock:
            meta = self._view(self._meta)
            meta[0] = meta[1] = meta[2] = 0
            meta[3] += 1
        self.wakeup.clear()
        self.drafted.clear()

    def set_draft_alive(self, alive: bool) -> None:
        self._view(self._meta)[4] = int(alive)
        self.drafted.set()  # a waiting target must not wait for a draft that is gone

    @property
    def draft_alive(self) -> bool:
        return bool(self._view(self._meta)[4])

    def draft_step_s(self) -> float:
        return self._view(self._meta)[5] / 1e6

    def _check(self, n: int) -> None:
        if n > self.capacity:
            raise ValueError(f"sequence of {n} tokens exceeds the shared capacity {self.capacity}")

    # target side ------------------------------------------------------------------------------
    def publish_committed(self, seq: list[int], n_prompt: int, done: bool) -> None:
        self._check(len(seq))
        with self.lock:
            meta = self._view(self._meta)
            self._view(self._committed)[n_prompt:len(seq)] = seq[n_prompt:]
            meta[0] = len(seq)
            meta[2] = int(done)
        self.wakeup.set()

    def read_drafts(self, committed: list[int], n_prompt: int, limit: int) -> list[int]:
        """Draft tokens that extend `committed`, at most `limit`; none while the draft still
        holds a sequence that disagrees with the committed text (before its rollback)."""
        if limit <= 0:
            return []
        n = len(committed)
        with self.lock:
            length = int(self._view(self._meta)[1])
            if length <= n:
                return []
            snapshot = self._view(self._drafts)[n_prompt:min(length, n + limit)].copy()
        if snapshot[: n - n_prompt].tolist() != committed[n_prompt:]:
            return []
        return snapshot[n - n_prompt:].tolist()

    # draft side -------------------------------------------------------------------------------
    def publish_drafts(self, seq: list[int], n_prompt: int, step_s: float | None = None) -> None:
        self._check(len(seq))
        with self.lock:
            self._view(self._drafts)[n_prompt:len(seq)] = seq[n_prompt:]
            meta = self._view(self._meta)
            meta[1] = len(seq)
            if step_s is not None:  # a moving average of the draft's step time
                meta[5] = int(0.8 * meta[5] + 0.2 * step_s * 1e6) if meta[5] else int(step_s * 1e6)
        self.drafted.set()

    def wait_for_drafts(self, committed: list[int], n_prompt: int, limit: int, want: int,
                        timeout: float) -> list[int]:
        """Drafts extending `committed`: blocks (never spins) until `want` of them exist, the
        timeout passes, or the draft is gone; returns what is there then."""
        import time

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
        with self.lock:
            meta = self._view(self._meta)
            n, done = int(meta[0]), bool(meta[2])
            generated = self._view(self._committed)[n_prompt:n].tolist() if n else []
        return prompt + generated, done

    def clear_wakeup(self) -> None:
        self.wakeup.clear()

    def wait_wakeup(self, timeout: float) -> None:
        self.wakeup.wait(timeout)
