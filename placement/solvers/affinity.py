"""Scalable affinity optimiser: co-locate experts that tokens visit in consecutive layers, under load balance.

Objective (maximised): colocated transition traffic, sum over l, i, j of trans[l, i, j] * [i and j share a bin],
with bins = nodes first, then GPUs within each node. Method: layer-chain block-coordinate descent. With every
other layer fixed, placing layer l is a capacitated assignment: expert e earns w[e, b] = traffic between e and
the experts already in bin b at layers l-1 and l+1. Each step solves it exactly as a linear assignment
(each bin repeated E/B times; scipy's Jonker-Volgenant), then repairs the per-bin load limit
(1 + eps) * mean with the cheapest load-reducing swaps. Sweeps alternate direction until no gain or the time
limit; random restarts keep the best. Redundant slots then take replicas chosen for both balance and affinity:
each replica goes where it adds the most colocated traffic while relieving the hottest GPU.

Dimension key: L layers, X layer pairs (L-1), E experts, B bins (GPUs or nodes), G GPUs, N nodes, P slots.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from placement.graph import RoutingGraph
from placement.plan import PlanError
from placement.solvers.base import PlanSpec, SolveResult, topology_cost
from placement.solvers.anneal import anneal, neighbour_weights
from placement.solvers.replicate import add_replicas

_BIG = 1e18


def assign_layer(
    w_EB: np.ndarray, load_SE: np.ndarray, limit_S: np.ndarray, allowed_EB: np.ndarray | None = None
) -> np.ndarray:
    """Best bin of each expert: maximise sum w[e, bin(e)] with E/B experts per bin and bin load <= ``limit``.

    Exact linear assignment without the load limit, then cheapest swaps until every bin is within it in every load fold (or no swap helps). ``allowed_EB`` restricts experts to some bins (e.g. the GPUs of their node). Returns int64 [E].
    """
    E, B = w_EB.shape
    cap = E // B
    cost_ES = -np.repeat(w_EB, cap, axis=1)
    if allowed_EB is not None:
        cost_ES = np.where(np.repeat(allowed_EB, cap, axis=1), cost_ES, _BIG)
    _, slot_E = linear_sum_assignment(cost_ES)
    col_E = np.empty(E, dtype=np.int64)
    col_E[np.arange(E)] = slot_E // cap
    return repair_balance(col_E, w_EB, load_SE, limit_S, allowed_EB)


def repair_balance(
    bin_E: np.ndarray,
    w_EB: np.ndarray,
    load_SE: np.ndarray,
    limit_S: np.ndarray,
    allowed_EB: np.ndarray | None = None,
    max_swaps: int | None = None,
) -> np.ndarray:
    """Swap experts off the worst bin until every bin is within its limit in every load fold.

    Loads are S folds (e.g. disjoint prompt subsets) ``load_SE`` with limits ``limit_S``; a bin's ratio is its
    worst load/limit over folds. Each step takes, among swaps (a on the worst bin, b elsewhere) that leave both
    bins below the worst bin's current ratio, the one losing the least score per unit of ratio reduced.
    Vectorised over all candidate pairs.
    """
    E, B = w_EB.shape
    bin_E = bin_E.copy()
    inv_S = 1.0 / np.maximum(limit_S, 1e-12)
    onehot_EB = np.zeros((E, B))
    onehot_EB[np.arange(E), bin_E] = 1.0
    binload_SB = load_SE @ onehot_EB
    for _ in range(max_swaps if max_swaps is not None else 4 * E):
        ratio_B = (binload_SB * inv_S[:, None]).max(axis=0)
        hot = int(np.argmax(ratio_B))
        worst = float(ratio_B[hot])
        if worst <= 1.0 + 1e-9:
            break
        a_A = np.flatnonzero(bin_E == hot)
        b_C = np.flatnonzero(bin_E != hot)
        h_C = bin_E[b_C]
        moved_SAC = load_SE[:, a_A][:, :, None] - load_SE[:, b_C][:, None, :]
        new_hot_AC = ((binload_SB[:, hot][:, None, None] - moved_SAC) * inv_S[:, None, None]).max(axis=0)
        new_other_AC = ((binload_SB[:, h_C][:, None, :] + moved_SAC) * inv_S[:, None, None]).max(axis=0)
        new_AC = np.maximum(new_hot_AC, new_other_AC)
        ok_AC = new_AC < worst - 1e-12
        if allowed_EB is not None:
            ok_AC &= allowed_EB[a_A][:, h_C] & allowed_EB[b_C, hot][None, :]
        if not ok_AC.any():
            break
        loss_AC = (w_EB[a_A, hot][:, None] + w_EB[b_C, h_C][None, :]) - (
            w_EB[a_A][:, h_C] + w_EB[b_C, hot][None, :]
        )
        gain_AC = worst - np.maximum(new_AC, 1.0)
        score_AC = np.where(ok_AC, loss_AC / np.maximum(gain_AC, 1e-12), np.inf)
        ai, ci = np.unravel_index(int(np.argmin(score_AC)), score_AC.shape)
        a, b = int(a_A[ai]), int(b_C[ci])
        h = int(bin_E[b])
        bin_E[a], bin_E[b] = h, hot
        binload_SB[:, hot] -= moved_SAC[:, ai, ci]
        binload_SB[:, h] += moved_SAC[:, ai, ci]
    return bin_E


def neighbour_score(
    l: int, bin_LE: np.ndarray, trans_XEE: np.ndarray, num_bins: int, only: str = "both"
) -> np.ndarray:
    """w_EB for layer l: traffic from bin b's experts at l-1 into e, plus from e to bin b's experts at l+1."""
    L, E = bin_LE.shape
    w = np.zeros((E, num_bins))
    if l > 0 and only in ("both", "prev"):
        onehot_EB = np.zeros((E, num_bins))
        onehot_EB[np.arange(E), bin_LE[l - 1]] = 1.0
        w += trans_XEE[l - 1].T @ onehot_EB
    if l < L - 1 and only in ("both", "next"):
        onehot_EB = np.zeros((E, num_bins))
        onehot_EB[np.arange(E), bin_LE[l + 1]] = 1.0
        w += trans_XEE[l] @ onehot_EB
    return w


def colocated(bin_LE: np.ndarray, trans_XEE: np.ndarray) -> float:
    """sum over l, i, j of trans[l, i, j] * [bin(l, i) == bin(l+1, j)]."""
    same_XEE = bin_LE[:-1, :, None] == bin_LE[1:, None, :]
    return float((trans_XEE * same_XEE).sum())


def chain_descent(
    trans_XEE: np.ndarray,
    load_SLE: np.ndarray,
    num_bins: int,
    eps: float,
    deadline: float,
    rng: np.random.Generator,
    allowed_LEB: np.ndarray | None = None,
    max_sweeps: int = 30,
) -> tuple[np.ndarray, float]:
    """Block-coordinate descent over layers from a greedy chain start. Returns (bin_LE, colocated traffic)."""
    S, L, E = load_SLE.shape
    limit_SL = (1.0 + eps) * load_SLE.sum(axis=2) / num_bins

    def place(l: int, w_EB: np.ndarray) -> np.ndarray:
        allowed = None if allowed_LEB is None else allowed_LEB[l]
        return assign_layer(w_EB, load_SLE[:, l], limit_SL[:, l], allowed)

    bin_LE = np.zeros((L, E), dtype=np.int64)
    start = int(rng.integers(L))
    bin_LE[start] = place(start, rng.random((E, num_bins)))
    for l in range(start + 1, L):
        bin_LE[l] = place(l, neighbour_score(l, bin_LE, trans_XEE, num_bins, only="prev"))
    for l in range(start - 1, -1, -1):
        bin_LE[l] = place(l, neighbour_score(l, bin_LE, trans_XEE, num_bins, only="next"))
    best = colocated(bin_LE, trans_XEE)
    for sweep in range(max_sweeps):
        if time.perf_counter() > deadline:
            break
        for l in range(L) if sweep % 2 == 0 else range(L - 1, -1, -1):
            bin_LE[l] = place(l, neighbour_score(l, bin_LE, trans_XEE, num_bins))
        score = colocated(bin_LE, trans_XEE)
        if score <= best * (1 + 1e-6):
            best = max(best, score)
            break
        best = score
    return bin_LE, best


def _fold_loads(graph: RoutingGraph) -> np.ndarray:
    """float64 [S, L, E]: loads of the graph's prompt folds (robust balance), or the total load as S = 1."""
    if graph.fold_load_SLE is not None and graph.fold_load_SLE.shape[0] > 1:
        return graph.fold_load_SLE.astype(np.float64)
    return graph.load_LE.astype(np.float64)[None]


def _best_of_restarts(
    trans: np.ndarray,
    load_SLE: np.ndarray,
    B: int,
    eps: float,
    deadline: float,
    rng: np.random.Generator,
    allowed: np.ndarray | None,
    info: dict[str, Any],
    level: str,
) -> np.ndarray:
    best_LE, best = None, -1.0
    durations: list[float] = []
    while True:
        t0 = time.perf_counter()
        bin_LE, score = chain_descent(trans, load_SLE, B, eps, deadline, rng, allowed)
        durations.append(time.perf_counter() - t0)
        if score > best:
            best_LE, best = bin_LE, score
        if time.perf_counter() + 1.2 * max(durations) > deadline or len(durations) >= 32:
            break
    info[f"{level}_restarts"] = len(durations)
    if best_LE is None:  # pragma: no cover - the loop runs at least once
        raise RuntimeError("affinity: no restart completed")
    return best_LE


def place_gpus(graph: RoutingGraph, spec: PlanSpec, eps: float, deadline: float) -> tuple[np.ndarray, dict[str, Any]]:
    """GPU of every expert, int64 [L, E] (E/G per GPU): nodes first (if N > 1), then GPUs within nodes, then
    swap annealing over all GPUs with the topology-weighted objective."""
    t0 = time.perf_counter()
    G, N = spec.num_gpus, spec.num_nodes
    trans = graph.trans_LEE.astype(np.float64)
    load_SLE = _fold_loads(graph)
    rng = np.random.default_rng(spec.seed)
    info: dict[str, Any] = {"load_folds": int(load_SLE.shape[0])}
    bcd_deadline = t0 + (deadline - t0) * 0.6
    allowed = None
    if N > 1:
        node_deadline = t0 + (deadline - t0) * 0.25
        node_LE = _best_of_restarts(trans, load_SLE, N, eps, node_deadline, rng, None, info, "node")
        allowed = (np.arange(G)[None, None, :] // (G // N)) == node_LE[:, :, None]
    gpu_LE = _best_of_restarts(trans, load_SLE, G, eps, bcd_deadline, rng, allowed, info, "gpu")
    info["bcd_colocated"] = colocated(gpu_LE, trans)
    # Swap annealing over all GPUs (crossing nodes), topology-weighted: a pair on one GPU is worth
    # inter_node_cost, on one node inter_node_cost - 1 (the cost saved against a cross-node pair).
    limit_SL = (1.0 + eps) * load_SLE.sum(axis=2) / G
    node_G = np.arange(G) // (G // N)
    gpu_w, node_w = (1.0, spec.inter_node_cost - 1.0) if N > 1 else (1.0, 0.0)
    W = neighbour_weights(gpu_LE, trans, G)
    iters_per_s = 4e6
    iters = int(max(0.0, deadline - time.perf_counter()) * iters_per_s)
    temp0 = float(spec.options.get("anneal_temp", 0.02)) * float(W.sum(axis=2).mean())
    anneal(gpu_LE, W, trans, load_SLE, limit_SL, node_G, gpu_w, node_w, iters, max(temp0, 1e-9), 1e-3 * max(temp0, 1e-9), spec.seed)
    info["anneal_iters"] = iters
    info["colocated"] = colocated(gpu_LE, trans)
    return gpu_LE, info


def solve_affinity(graph: RoutingGraph, spec: PlanSpec) -> SolveResult:
    """Affinity placement; see the module docstring. Replicas fill ``spec.num_redundant`` slots."""
    t0 = time.perf_counter()
    E, G = graph.num_experts, spec.num_gpus
    if E % G:
        raise PlanError(f"affinity needs E={E} divisible by --gpus {G} (replicas go on top of E/G per GPU)")
    budget = float(spec.options.get("affinity_budget", min(spec.time_limit, 10.0)))
    deadline = t0 + 0.85 * budget
    eps = spec.balance_eps * float(spec.options.get("fit_margin", 0.6))
    gpu_LE, info = place_gpus(graph, spec, eps, deadline)
    phy2log_LP = add_replicas(gpu_LE, graph, spec)
    info["fit_eps"] = eps
    obj = topology_cost(phy2log_LP, graph, spec)
    return SolveResult(phy2log_LP, "affinity", "heuristic", objective=obj, solve_seconds=time.perf_counter() - t0, info=info)
