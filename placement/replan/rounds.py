"""Order the copies of a migration in rounds for GPUs that have ONE spare expert slot each.

A round: every GPU receives at most one expert (of any layer) into its spare slot, reading from a source that
still holds it; then each receiving GPU frees one slot of that layer (the *eviction*), so that its spare is free
again. It may free an expert it holds more copies of than the new plan needs, provided that it either keeps
another copy or every copy that reads this one from it is done by the end of the round.

Rounds are built one at a time on the simulated slot contents:

1. *free* copies first: a GPU whose layer has an evictable expert that nothing still reads (or of which it keeps
   another copy) takes a copy into that layer;
2. then *closures* for the GPUs left: a copy into g whose eviction e is still read by copies into other GPUs
   takes those copies into the same round, each with its own eviction, recursively (a rotation of experts
   between GPUs), by depth-first search with backtracking over the evictions, with each GPU used at most once.

Dimension key: L MoE layers, E experts, G GPUs, M copies.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from placement.plan import PlanError

Copy = tuple[int, int, int, int]  # (layer, expert, src GPU, dst GPU)
Chosen = dict[int, tuple[int, int]]  # dst GPU -> (copy id, evicted expert)

_SEARCH_CALLS = 4000  # per closure attempt


class _Rounds:
    """Slot contents and pending copies; Python containers, as the search touches single entries."""

    def __init__(self, cnt_LEG: np.ndarray, need_LEG: np.ndarray, copies: list[Copy]) -> None:
        self.cnt = np.asarray(cnt_LEG).tolist()  # [l][e][g]
        self.need = np.asarray(need_LEG).tolist()
        self.copies = copies
        self.reads: dict[tuple[int, int, int], set[int]] = defaultdict(set)  # (layer, gpu, expert) -> copy ids
        self.into: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))  # gpu -> layer -> ids
        self.excess: dict[tuple[int, int], set[int]] = defaultdict(set)  # (layer, gpu) -> evictable experts
        for m, (l, e, src, dst) in enumerate(copies):
            self.reads[(l, src, e)].add(m)
            self.into[dst][l].add(m)
        for l, e, g in zip(*np.nonzero(np.asarray(cnt_LEG) > np.asarray(need_LEG)), strict=True):
            self.excess[(int(l), int(g))].add(int(e))
        self.calls = 0

    def blockers(self, l: int, g: int, e: int, chosen_ids: set[int]) -> list[int]:
        """Copies that must join the round before g may free e at layer l."""
        if self.cnt[l][e][g] > 1:
            return []
        return sorted(self.reads.get((l, g, e), set()) - chosen_ids)

    def unblocks(self, m: int) -> bool:
        """Whether copy m reads the last copy of an expert its source will free."""
        l, e, src, _ = self.copies[m]
        return self.cnt[l][e][src] == 1 and self.need[l][e][src] == 0

    def order(self, g: int, l: int) -> list[int]:
        return sorted(self.into[g][l], key=lambda m: (not self.unblocks(m), m))

    def layers(self, g: int) -> list[int]:
        return sorted(self.into[g], key=lambda l: (-len(self.into[g][l]), l))

    def close(self, m: int, chosen: Chosen) -> Chosen | None:
        """``chosen`` plus copy m and the copies its eviction waits for, recursively; None if impossible."""
        l, _, _, g = self.copies[m]
        if g in chosen:
            return chosen if chosen[g][0] == m else None
        self.calls += 1
        if self.calls > _SEARCH_CALLS:
            return None
        ids = {c for c, _ in chosen.values()} | {m}
        options = sorted(self.excess[(l, g)], key=lambda e: (len(self.blockers(l, g, e, ids)), e))
        for e in options:
            trial: Chosen | None = {**chosen, g: (m, e)}
            for r in self.blockers(l, g, e, ids):
                trial = None if trial is None else self.close(r, trial)
            if trial is not None:
                return trial
        return None

    def next_round(self) -> Chosen:
        chosen: Chosen = {}
        gpus = sorted(self.into, key=lambda g: (-sum(map(len, self.into[g].values())), g))
        for g in gpus:
            ids = {c for c, _ in chosen.values()}
            for l in self.layers(g):
                free = sorted(e for e in self.excess[(l, g)] if not self.blockers(l, g, e, ids))
                if free:
                    chosen[g] = (self.order(g, l)[0], free[0])
                    break
        for g in gpus:
            if g in chosen:
                continue
            self.calls = 0
            for l in self.layers(g):
                found = next((c for m in self.order(g, l) if (c := self.close(m, chosen)) is not None), None)
                if found is not None:
                    chosen = found
                    break
        return chosen

    def apply(self, chosen: Chosen) -> None:
        for g, (m, evict) in chosen.items():
            l, e, src, _ = self.copies[m]
            self.cnt[l][e][g] += 1
            self.cnt[l][evict][g] -= 1
            if self.cnt[l][evict][g] <= self.need[l][evict][g]:
                self.excess[(l, g)].discard(evict)
            self.reads[(l, src, e)].discard(m)
            self.into[g][l].discard(m)
            if not self.into[g][l]:
                del self.into[g][l]
            if not self.into[g]:
                del self.into[g]


def schedule_rounds(cnt_LEG: np.ndarray, need_LEG: np.ndarray, copies: list[Copy]) -> tuple[list[int], list[int]]:
    """(round, evicted expert) of each copy. ``cnt_LEG``/``need_LEG``: replicas per GPU now / in the new plan."""
    state = _Rounds(cnt_LEG, need_LEG, copies)
    round_M, evict_M = [-1] * len(copies), [-1] * len(copies)
    r = 0
    while state.into:
        chosen = state.next_round()
        if not chosen:
            raise PlanError("could not order the moves in rounds with one spare slot per GPU; report this plan pair")
        for m, evict in chosen.values():
            round_M[m], evict_M[m] = r, evict
        state.apply(chosen)
        r += 1
    return round_M, evict_M
