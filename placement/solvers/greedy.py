"""Balanced, topology-aware greedy placement (no replicas): EPLB packing, then pairwise-swap local search.

The cost of a placement is ``placement.planner.topology_cost``: for each layer pair l -> l+1 and expert pair
(i, j), trans[l, i, j] times dist[gpu_of[l, i], gpu_of[l+1, j]], where ``dist_GG`` is 0 on one GPU, 1 between
GPUs of one node and ``inter_node_cost`` across nodes. Balance: each GPU's load per layer <= cap[l] =
(1 + eps) * mean GPU load of layer l.

Local search swaps two experts of one layer that sit on different GPUs. With the neighbouring layers fixed, the
change of cost of every swap of a layer is exact and computed for all pairs at once; all even layers move
together, then all odd layers (their costs do not interact). A swap is taken when it lowers
``BIG * excess + cost``, where ``excess`` is the load above the caps, so the search first repairs balance and
never makes it worse.

Dimension key: L layers, X layer pairs (L - 1), E experts, G GPUs, N nodes.
"""

from __future__ import annotations

import numpy as np

from placement.graph import RoutingGraph
from placement.solvers.base import PlanSpec
from placement.solvers.baselines import eplb_phy2log

__all__ = ["balance_cap_L", "distance_GG", "gpu_cost", "greedy_gpu_of", "local_search", "phy2log_to_gpu_of"]


def distance_GG(num_gpus: int, num_nodes: int, inter_node_cost: float) -> np.ndarray:
    """float64 [G, G]: 0 on the diagonal, 1 within a node, ``inter_node_cost`` across nodes."""
    node_G = np.arange(num_gpus) // (num_gpus // num_nodes)
    same_node_GG = node_G[:, None] == node_G[None, :]
    dist_GG = np.where(same_node_GG, 1.0, float(inter_node_cost))
    np.fill_diagonal(dist_GG, 0.0)
    return dist_GG


def balance_cap_L(load_LE: np.ndarray, num_gpus: int, eps: float) -> np.ndarray:
    """float64 [L]: the most load one GPU may take per layer, (1 + eps) * mean GPU load."""
    return (1.0 + eps) * load_LE.sum(axis=1).astype(np.float64) / num_gpus


def phy2log_to_gpu_of(phy2log_LP: np.ndarray, num_gpus: int) -> np.ndarray:
    """phy2log [L, P=E] (one slot per expert) -> gpu_of_LE int64 [L, E]."""
    L, P = phy2log_LP.shape
    gpu_of_LE = np.empty((L, P), dtype=np.int64)
    np.put_along_axis(gpu_of_LE, phy2log_LP, np.broadcast_to(np.arange(P) // (P // num_gpus), (L, P)), axis=1)
    return gpu_of_LE


def _onehot_LEG(gpu_of_LE: np.ndarray, num_gpus: int) -> np.ndarray:
    return (gpu_of_LE[:, :, None] == np.arange(num_gpus)).astype(np.float64)


def gpu_cost(gpu_of_LE: np.ndarray, trans_XEE: np.ndarray, dist_GG: np.ndarray) -> float:
    """Topology cost of a one-replica placement (equals ``planner.topology_cost`` of its plan)."""
    if trans_XEE.shape[0] == 0:
        return 0.0
    d_XEE = dist_GG[gpu_of_LE[:-1, :, None], gpu_of_LE[1:, None, :]]
    return float((trans_XEE * d_XEE).sum())


def _move_cost_LEG(gpu_of_LE: np.ndarray, trans_XEE: np.ndarray, dist_GG: np.ndarray) -> np.ndarray:
    """float64 [L, E, G]: cost of the edges of expert e of layer l if it sat on GPU g (neighbours fixed)."""
    L, E = gpu_of_LE.shape
    G = dist_GG.shape[0]
    oh_LEG = _onehot_LEG(gpu_of_LE, G)
    t = trans_XEE.astype(np.float64)
    cost_LEG = np.zeros((L, E, G))
    if L > 1:
        # Edges to the next layer: traffic of e to each GPU of layer l+1, times the distance from g.
        cost_LEG[:-1] += np.einsum("xij,xjh,gh->xig", t, oh_LEG[1:], dist_GG)
        # Edges from the previous layer.
        cost_LEG[1:] += np.einsum("xij,xih,hg->xjg", t, oh_LEG[:-1], dist_GG)
    return cost_LEG


def local_search(
    gpu_of_LE: np.ndarray,
    load_LE: np.ndarray,
    trans_XEE: np.ndarray,
    dist_GG: np.ndarray,
    cap_L: np.ndarray,
    max_rounds: int = 500,
) -> np.ndarray:
    """Best-improvement pairwise swaps, all layers of one parity at once, until no swap improves."""
    gpu_LE = gpu_of_LE.astype(np.int64).copy()
    L, E = gpu_LE.shape
    G = dist_GG.shape[0]
    w_LE = load_LE.astype(np.float64)
    big = float(trans_XEE.sum()) * float(dist_GG.max()) + 1.0
    a_E, b_E = np.triu_indices(E, k=1)
    stale = 0
    for rnd in range(max_rounds):
        layers_S = np.arange(rnd % 2, L, 2)
        cost_SEG = _move_cost_LEG(gpu_LE, trans_XEE, dist_GG)[layers_S]
        g_SE = gpu_LE[layers_S]
        s_S = np.arange(len(layers_S))[:, None]
        ga, gb = g_SE[:, a_E], g_SE[:, b_E]
        dcost = cost_SEG[s_S, a_E, gb] + cost_SEG[s_S, b_E, ga] - cost_SEG[s_S, a_E, ga] - cost_SEG[s_S, b_E, gb]
        # Load change: a leaves ga for gb, b leaves gb for ga.
        gl_SG = np.einsum("seg,se->sg", _onehot_LEG(g_SE, G), w_LE[layers_S])
        la, lb = w_LE[layers_S][:, a_E], w_LE[layers_S][:, b_E]
        cap = cap_L[layers_S][:, None]
        old_a, old_b = np.take_along_axis(gl_SG, ga, 1), np.take_along_axis(gl_SG, gb, 1)
        new_a, new_b = old_a - la + lb, old_b - lb + la
        dexcess = (
            np.maximum(new_a - cap, 0) + np.maximum(new_b - cap, 0)
            - np.maximum(old_a - cap, 0) - np.maximum(old_b - cap, 0)
        )  # fmt: skip
        score = np.where(ga != gb, big * dexcess + dcost, np.inf)
        best_S = np.argmin(score, axis=1)
        gain_S = score[np.arange(len(layers_S)), best_S]
        move_S = gain_S < -1e-9
        if move_S.any():
            stale = 0
            ls, pa, pb = layers_S[move_S], a_E[best_S[move_S]], b_E[best_S[move_S]]
            gpu_LE[ls, pa], gpu_LE[ls, pb] = gpu_LE[ls, pb], gpu_LE[ls, pa].copy()
        else:
            stale += 1
            if stale >= 2 or L == 1:
                break
    return gpu_LE


def greedy_gpu_of(graph: RoutingGraph, spec: PlanSpec) -> np.ndarray:
    """int64 [L, E]: EPLB's balanced packing (one replica each), improved by ``local_search``."""
    G = spec.num_gpus
    load_LE = graph.load_LE.astype(np.float64)
    start_LE = phy2log_to_gpu_of(eplb_phy2log(load_LE, graph.num_experts, G, spec.num_nodes), G)
    dist_GG = distance_GG(G, spec.num_nodes, spec.inter_node_cost)
    cap_L = balance_cap_L(load_LE, G, spec.balance_eps)
    return local_search(start_LE, load_LE, graph.trans_LEE, dist_GG, cap_L)
