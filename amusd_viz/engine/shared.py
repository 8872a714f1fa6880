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
        self.wakeup = ctx.Event()
        self._committed = ctx.RawArray("q", capacity)
        self._drafts = ctx.RawArray("q", capacity)
        # [committed_len, drafts_len, done, epoch]
        self._meta = ctx.RawArray("q", 4)

    # numpy views are made lazily in each process (RawArrays pickle, views do not)
    def _view(self, raw) -> np.ndarray:
        return np.frombuffer(raw, dtype=np.int64)

    def reset(self) -> None:
        with self.lock:
            meta = self._view(self._meta)
            meta[0] = meta[1] = meta[2] = 0
            meta[3] += 1
        self.wakeup.clear()

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
    def publish_drafts(self, seq: list[int], n_prompt: int) -> None:
        self._check(len(seq))
        with self.lock:
            self._view(self._drafts)[n_prompt:len(seq)] = seq[n_prompt:]
            self._view(self._meta)[1] = len(seq)

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
