"""What every solver takes and returns.

A solver is a pure function ``solve(graph, spec) -> SolveResult`` over the routing graph of the training trace.

Dimension key: L MoE layers, E experts, P physical slots, G GPUs, N nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from placement.graph import RoutingGraph
from placement.plan import PlanError


@dataclass(frozen=True)
class PlanSpec:
    """What to place onto: G GPUs on N nodes, ``num_redundant`` extra slots per layer, balance tolerance.

    ``balance_eps``: each GPU's load per layer must stay <= (1 + eps) * mean (solvers that can enforce it).
    ``auto_balance``: ignore ``balance_eps`` and let the planner choose the balance: the affinity optimiser plans
    for EPLB's forecast balance on unseen prompts (placement/solvers/balance_target.py), other balancing solvers
    take EPLB's balance on the fitted trace.
    ``inter_node_cost``: cost of a token pair split across nodes relative to one split across GPUs of a node.
    ``options["objective"] == "time"`` (with ``options["hardware"]`` / ``["model_dims"]``, HardwarePreset and
    ModelDims JSON): the plan of the lowest predicted step time instead (placement/solvers/time_objective.py).
    """

    num_gpus: int
    num_nodes: int = 1
    num_redundant: int = 0
    balance_eps: float = 0.1
    time_limit: float = 60.0
    seed: int = 0
    inter_node_cost: float = 4.0
    auto_balance: bool = False
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    def validate(self, num_experts: int) -> None:
        G, N, E, R = self.num_gpus, self.num_nodes, num_experts, self.num_redundant
        if G < 1 or N < 1:
            raise PlanError(f"--gpus {G} / --nodes {N}: both must be >= 1")
        if G % N:
            raise PlanError(f"--gpus {G} is not divisible by --nodes {N}; use a node count that divides it")
        if R < 0:
            raise PlanError(f"--redundant {R}: must be >= 0")
        if R == 0 and E % G:
            raise PlanError(f"{E} experts cannot be split evenly over --gpus {G}; pick G dividing E or add --redundant")
        if (E + R) % G:
            raise PlanError(f"E + redundant = {E + R} slots is not divisible by --gpus {G}; adjust --redundant")
        if R and (E + R) % N:
            raise PlanError(f"{E + R} slots are not divisible by --nodes {N}")
        if self.time_limit <= 0:
            raise PlanError(f"--time-limit {self.time_limit}: must be > 0 seconds")
        if not 0 <= self.balance_eps < 100:
            raise PlanError(f"--balance {self.balance_eps}: must be >= 0 (e.g. 0.05 for 5% over the mean)")


@dataclass(frozen=True)
class SolveResult:
    """phy2log_LP int64 [L, P]; objective/bound in the solver's own objective units (lower is better);
    gap = (objective - bound) / objective (0 when proven optimal, None when no bound is known)."""

    phy2log_LP: np.ndarray
    solver: str
    status: str
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None
    solve_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def relative_gap(objective: float | None, bound: float | None) -> float | None:
    if objective is None or bound is None:
        return None
    if objective <= 1e-12:
        return 0.0
    return max(0.0, (objective - bound) / abs(objective))


def topology_cost(phy2log_LP: np.ndarray, graph: RoutingGraph, spec: PlanSpec) -> float:
    """Cross-GPU transition traffic weighted by topology: for each layer pair and expert pair (i, j) the count
    trans[l, i, j] times 0 if some GPU holds both, else 1 if some node holds both, else ``inter_node_cost``."""
    P = phy2log_LP.shape[1]
    G, N, E = spec.num_gpus, spec.num_nodes, graph.num_experts
    L = phy2log_LP.shape[0]
    gpu_P = np.arange(P) // (P // G)
    H_LEG = np.zeros((L, E, G), dtype=np.float32)
    np.add.at(H_LEG, (np.repeat(np.arange(L), P), phy2log_LP.reshape(-1), np.tile(gpu_P, L)), 1.0)
    H_LEG = np.minimum(H_LEG, 1.0)
    H_LEN = H_LEG.reshape(L, E, N, G // N).max(axis=3)
    if L < 2:
        return 0.0
    same_gpu = np.einsum("xig,xjg->xij", H_LEG[:-1], H_LEG[1:]) > 0
    same_node = np.einsum("xin,xjn->xij", H_LEN[:-1], H_LEN[1:]) > 0
    cost = np.where(same_gpu, 0.0, np.where(same_node, 1.0, spec.inter_node_cost))
    return float((graph.trans_LEE * cost).sum())


def capacity_lower_bound(graph: RoutingGraph, spec: PlanSpec) -> float:
    """A lower bound on ``topology_cost`` valid for every plan of ``spec`` (the capacity bound).

    Expert i at layer l with c copies can share a GPU with at most c * P/G experts of layer l+1 (and a node with
    at most c * P/N), so at best its heaviest such successors are co-located. Copies are limited to R extra
    per layer: the bound gives them where they co-locate the most (the gains are concave in c, so taking the
    R largest marginal gains is optimal). cost = c_inter * total - (c_inter - 1) * node_colocated
    - gpu_colocated, bounded with both co-located totals at their maxima.
    """
    if graph.trans_LEE.shape[0] == 0:
        return 0.0
    G, N, E, R = spec.num_gpus, spec.num_nodes, graph.num_experts, spec.num_redundant
    P = E + R
    srt_XEE = -np.sort(-graph.trans_LEE.astype(np.float64), axis=2)
    cum_XEE = np.concatenate([np.zeros((*srt_XEE.shape[:2], 1)), np.cumsum(srt_XEE, axis=2)], axis=2)
    total = float(cum_XEE[:, :, -1].sum())
    gpu_best = _best_colocated(cum_XEE, P // G, R, G)
    if N == 1:
        return max(0.0, total - gpu_best)
    node_best = _best_colocated(cum_XEE, P // N, R, N)
    c = spec.inter_node_cost
    return max(0.0, c * total - (c - 1.0) * node_best - gpu_best)


def _best_colocated(cum_XEK: np.ndarray, per_bin: int, extra: int, bins: int) -> float:
    """Upper bound on co-located pairs with ``per_bin`` successors per copy and ``extra`` copies per layer."""
    X, _, K1 = cum_XEK.shape
    cap = K1 - 1
    copies = 1 + min(extra, bins - 1)
    reach_C = np.minimum(np.arange(1, copies + 1) * per_bin, cap)
    top_XEC = cum_XEK[:, :, reach_C]
    base = float(top_XEC[:, :, 0].sum())
    if copies == 1 or extra == 0:
        return base
    gain_XEM = np.diff(top_XEC, axis=2).reshape(X, -1)  # marginal gain of the 2nd, 3rd, ... copy
    k = min(extra, gain_XEM.shape[1])
    best_XK = -np.partition(-gain_XEM, k - 1, axis=1)[:, :k]
    return base + float(best_XK.sum())
