"""The service's view of recent traffic: routing counts decayed by a half-life in tokens.

A token observed ``n`` tokens ago weighs 0.5 ** (n / half_life). A batch of T tokens is folded in at once: the
counts so far are multiplied by 0.5 ** (T / half_life), then the batch's counts are added at weight 1. Counts
are the ones of ../shared/METRICS.md (placement/graph.py counts them): loads, adjacent-layer transitions, and the
loads per prompt fold that the robust balance and the unseen-imbalance forecast need (placement/solvers/robust.py).
Without a half-life (0) nothing decays. A batch of fewer than ``MIN_PROMPTS`` prompts (one long prompt, or a
decode stream under one id) would leave the forecast a single fold per prompt, so its sampling units are
contiguous token blocks instead (``TOKEN_BLOCKS`` per batch, never across prompts).

Dimension key: T tokens, L MoE layers, K top-k, E experts, S prompt folds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from placement.graph import PROMPT_FOLDS, GraphAccumulator, RoutingGraph, fold_of_seq, nonempty_folds
from placement.trace.schema import RouteArrays, TraceMeta

# a batch with fewer prompts than this is sampled by TOKEN_BLOCKS contiguous token blocks (module docstring)
MIN_PROMPTS = 8
TOKEN_BLOCKS = 32


class ObservationError(ValueError):
    """Routing that cannot be counted for this service; the message is one line naming the field and the fix."""


@dataclass(frozen=True)
class Counts:
    """Routing counts of one batch of traffic, ready to fold into the window.

    load_LE float64 [L, E]; trans_LEE float64 [L-1, E, E] or None (loads-only sources); fold_load_SLE float64
    [S, L, E] (sum over S = load_LE)."""

    num_tokens: int
    load_LE: np.ndarray
    trans_LEE: np.ndarray | None
    fold_load_SLE: np.ndarray


def count_routes(routes: RouteArrays, meta: TraceMeta, num_folds: int = PROMPT_FOLDS) -> Counts:
    """Counts of per-token routing (the graph kernel of placement/graph.py; folds from the prompt ids, or from
    token blocks when they fill fewer than ``MIN_PROMPTS`` folds)."""
    acc = GraphAccumulator(meta, with_coact=False, num_folds=num_folds)
    acc.add(routes.expert_ids_TLK, routes.seq_ids_T)
    counts = graph_counts(acc.result(), num_folds)
    if not few_prompts(counts):
        return counts
    fold_SLE = block_fold_loads([routes], meta, routes.num_tokens, num_folds)
    return Counts(counts.num_tokens, counts.load_LE, counts.trans_LEE, fold_SLE)


def few_prompts(counts: Counts) -> bool:
    """Whether the batch's prompts filled fewer than ``MIN_PROMPTS`` folds (``block_fold_loads`` then)."""
    return bool(counts.num_tokens > 0 and nonempty_folds(counts.fold_load_SLE).shape[0] < MIN_PROMPTS)


def block_fold_loads(
    batches: Iterable[RouteArrays], meta: TraceMeta, num_tokens: int, num_folds: int = PROMPT_FOLDS
) -> np.ndarray:
    """float64 [S, L, E]: the loads of a batch of ``num_tokens`` tokens (given in ``batches``, in order) per fold
    of its token blocks: TOKEN_BLOCKS blocks of consecutive tokens, a prompt's tokens never sharing a block with
    another prompt's."""
    block = max(-(-num_tokens // TOKEN_BLOCKS), 1)
    acc = GraphAccumulator(meta, with_coact=False, num_folds=num_folds)
    start = 0
    for b in batches:
        t_T = start + np.arange(b.num_tokens, dtype=np.int64)
        acc.add(b.expert_ids_TLK, b.seq_ids_T.astype(np.int64) * TOKEN_BLOCKS + t_T // block)
        start += b.num_tokens
    fold_SLE = acc.result().fold_load_SLE
    empty_SLE = np.zeros((num_folds, meta.num_layers, meta.num_experts))
    return empty_SLE if fold_SLE is None else fold_SLE.astype(np.float64)


def graph_counts(g: RoutingGraph, num_folds: int = PROMPT_FOLDS) -> Counts:
    """Counts of a routing graph (built with ``num_folds`` prompt folds; without them all load is in fold 0)."""
    if g.fold_load_SLE is None:
        fold_SLE = np.zeros((num_folds, *g.load_LE.shape))
        fold_SLE[0] = g.load_LE
    else:
        fold_SLE = g.fold_load_SLE.astype(np.float64)
    return Counts(g.num_tokens, g.load_LE.astype(np.float64), g.trans_LEE.astype(np.float64), fold_SLE)


def count_loads(
    num_tokens: int, load_LE: np.ndarray, trans_LEE: np.ndarray | None, batch_id: int, num_folds: int = PROMPT_FOLDS
) -> Counts:
    """Counts of a source that exports only totals (SGLang's expert-distribution recorder): the whole batch
    is one sampling unit, so its loads go to the prompt fold of ``batch_id``."""
    fold_SLE = np.zeros((num_folds, *load_LE.shape))
    fold_SLE[int(fold_of_seq(np.array([batch_id]), num_folds)[0])] = load_LE
    trans = None if trans_LEE is None else np.asarray(trans_LEE, dtype=np.float64)
    return Counts(int(num_tokens), np.asarray(load_LE, dtype=np.float64), trans, fold_SLE)


class DecayedWindow:
    """Decayed routing counts of the traffic seen so far, and the undecayed total of tokens.

    ``observed_tokens`` counts every token ever folded in (an int, never decayed); ``weight`` is the decayed
    token mass the counts stand for; ``fresh_LE`` the loads since the last ``take_fresh`` (not decayed: what
    the plan of the last decision served, against which the service scores that decision's forecast)."""

    def __init__(self, meta: TraceMeta, half_life: float = 0.0, num_folds: int = PROMPT_FOLDS) -> None:
        if half_life < 0:
            raise ObservationError(f"half_life={half_life}: must be >= 0 tokens (0 = no decay)")
        L, E = meta.num_layers, meta.num_experts
        self.meta = meta
        self.half_life = float(half_life)
        self.observed_tokens = 0
        self.weight = 0.0
        self.load_LE = np.zeros((L, E))
        self.trans_LEE = np.zeros((max(L - 1, 0), E, E))
        self.fold_load_SLE = np.zeros((num_folds, L, E))
        self.fresh_LE = np.zeros((L, E))

    def check(self, c: Counts, where: str) -> None:
        """Raise ObservationError unless ``c`` has this model's shapes and finite non-negative counts."""
        L, E = self.load_LE.shape
        arrays = [("load_LE", c.load_LE, (L, E)), ("fold loads", c.fold_load_SLE, self.fold_load_SLE.shape)]
        if c.trans_LEE is not None:
            arrays.append(("trans_LEE", c.trans_LEE, self.trans_LEE.shape))
        for name, a, shape in arrays:
            if a.shape != shape:
                raise ObservationError(f"{where}: {name} has shape {list(a.shape)}, this model needs {list(shape)}")
            if a.size and not (np.isfinite(a).all() and a.min() >= 0):
                raise ObservationError(f"{where}: {name} holds negative or non-finite counts; send counts >= 0")
        if c.num_tokens < 0:
            raise ObservationError(f"{where}: num_tokens={c.num_tokens}; send the batch's token count (>= 0)")

    def add(self, c: Counts) -> None:
        """Decay the window by the batch's tokens, then add the batch (call ``check`` first)."""
        keep = 0.5 ** (c.num_tokens / self.half_life) if self.half_life > 0 else 1.0
        for a in (self.load_LE, self.trans_LEE, self.fold_load_SLE):
            a *= keep
        self.load_LE += c.load_LE
        self.fresh_LE += c.load_LE
        self.fold_load_SLE += c.fold_load_SLE
        if c.trans_LEE is not None:
            self.trans_LEE += c.trans_LEE
        self.weight = self.weight * keep + c.num_tokens
        self.observed_tokens += c.num_tokens

    def graph(self) -> RoutingGraph:
        """The window as a RoutingGraph with float64 counts (what re-planning reads)."""
        return RoutingGraph(
            self.meta,
            round(self.weight),
            self.load_LE.copy(),
            self.trans_LEE.copy(),
            None,
            self.fold_load_SLE.copy(),
        )

    def take_fresh(self) -> np.ndarray:
        """The loads since the last call, float64 [L, E]; starts the next interval."""
        fresh_LE, self.fresh_LE = self.fresh_LE, np.zeros_like(self.fresh_LE)
        return fresh_LE

    # ------------------------------------------------------------------ persistence
    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "load_LE": self.load_LE,
            "fresh_load_LE": self.fresh_LE,
            "trans_LEE": self.trans_LEE,
            "fold_load_SLE": self.fold_load_SLE,
            "scalars": np.array([self.observed_tokens, self.weight, self.half_life], dtype=np.float64),
        }

    def restore(self, arrays: dict[str, np.ndarray], where: str) -> None:
        """Load counts saved by ``arrays`` (same model shapes); the half-life of this run is kept."""
        for name in ("load_LE", "trans_LEE", "fold_load_SLE"):
            own = getattr(self, name)
            if name not in arrays or arrays[name].shape != own.shape:
                raise ObservationError(
                    f"{where}: saved {name} does not fit this model ({list(own.shape)}); "
                    "use a fresh --state directory for another model"
                )
            own[...] = arrays[name]
        fresh = arrays.get("fresh_load_LE")  # absent in a checkpoint written before it was kept
        self.fresh_LE[...] = fresh if fresh is not None and fresh.shape == self.fresh_LE.shape else 0.0
        tokens, weight, _ = arrays["scalars"].tolist()
        self.observed_tokens = int(tokens)
        self.weight = float(weight)
