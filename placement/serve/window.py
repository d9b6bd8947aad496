"""The service's view of recent traffic: routing counts decayed by a half-life in tokens.

A token observed ``n`` tokens ago weighs 0.5 ** (n / half_life). A batch of T tokens is folded in at once: the
counts so far are multiplied by 0.5 ** (T / half_life), then the batch's counts are added at weight 1. Counts
are the ones of ../shared/METRICS.md (placement/graph.py counts them): loads, adjacent-layer transitions, and the
loads per prompt fold that the robust balance and the unseen-imbalance forecast need (placement/solvers/robust.py).
Without a half-life (0) nothing decays.

Dimension key: T tokens, L MoE layers, K top-k, E experts, S prompt folds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.graph import PROMPT_FOLDS, GraphAccumulator, RoutingGraph, fold_of_seq
from placement.trace.schema import RouteArrays, TraceMeta


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
    """Counts of per-token routing (the graph kernel of placement/graph.py; folds from the prompt ids)."""
    acc = GraphAccumulator(meta, with_coact=False, num_folds=num_folds)
    acc.add(routes.expert_ids_TLK, routes.seq_ids_T)
    return graph_counts(acc.result(), num_folds)


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
    token mass the counts stand for."""

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

    # ------------------------------------------------------------------ persistence
    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "load_LE": self.load_LE,
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
        tokens, weight, _ = arrays["scalars"].tolist()
        self.observed_tokens = int(tokens)
        self.weight = float(weight)
