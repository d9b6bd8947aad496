"""Affinity-aware replication: fill redundant slots with replicas that relieve load *and* co-locate traffic.

Given a one-replica placement gpu_LE (E/G experts per GPU), each GPU has (P - E)/G redundant slots per layer.
Layer by layer (so that replicas at layer l count when layer l+1 is filled), each free slot of GPU g takes the
expert e maximising the transition traffic that a replica of e on g newly co-locates (with experts at l-1 and
l+1 already on g), among the moves that keep every GPU's load within the limit (or, while a GPU is over it,
lower the maximum): load is shared equally among replicas, as ../shared/METRICS.md defines.

Dimension key: L layers, E experts, G GPUs, P slots.
"""

from __future__ import annotations

import numpy as np

from placement.graph import RoutingGraph
from placement.plan import gpu_of_expert_to_phy2log
from placement.solvers.base import PlanSpec


def _gpu_load(c_E: np.ndarray, H_EG: np.ndarray) -> np.ndarray:
    cnt_E = H_EG.sum(axis=1)
    return np.asarray((c_E / cnt_E) @ H_EG)


def replicate_layer(
    c_E: np.ndarray,
    H_EG: np.ndarray,
    free_G: np.ndarray,
    w_EG: np.ndarray,
    limit: float,
    balance_weight: float,
) -> np.ndarray:
    """Fill ``free_G`` slots per GPU; returns the new holder counts H_EG (int, replicas per GPU).

    ``w_EG``: traffic co-located by putting a replica of e on g. Each step picks the best feasible (e, g) by
    w + balance_weight * (reduction of the maximum GPU load).
    """
    H = H_EG.copy()
    free = free_G.copy()
    E, G = H.shape
    while free.sum() > 0:
        cnt_E = H.sum(axis=1).astype(np.float64)
        load_G = _gpu_load(c_E, H)
        share_old_E = c_E / cnt_E
        share_new_E = c_E / (cnt_E + 1)
        # load of every GPU after adding e on g: holders of e lose (old - new) per replica, g gains new share.
        delta_EG = (share_new_E - share_old_E)[:, None] * H
        new_EGG = load_G[None, None, :] + delta_EG[:, None, :]
        new_EGG[:, np.arange(G), np.arange(G)] += share_new_E[:, None]
        new_max_EG = new_EGG.max(axis=2)
        cur_max = load_G.max()
        ok_EG = (H == 0) & (free[None, :] > 0)
        ok_EG &= (new_max_EG <= limit + 1e-9) | (new_max_EG < cur_max - 1e-9)
        if not ok_EG.any():
            ok_EG = (H == 0) & (free[None, :] > 0)
        score_EG = w_EG + balance_weight * (cur_max - new_max_EG)
        score_EG = np.where(ok_EG, score_EG, -np.inf)
        e, g = np.unravel_index(int(np.argmax(score_EG)), score_EG.shape)
        H[e, g] += 1
        free[g] -= 1
    return H


def add_replicas(gpu_LE: np.ndarray, graph: RoutingGraph, spec: PlanSpec) -> np.ndarray:
    """phy2log int64 [L, P] from gpu_LE plus ``spec.num_redundant`` affinity-aware replicas per layer."""
    L, E = gpu_LE.shape
    G, R = spec.num_gpus, spec.num_redundant
    if R == 0:
        return gpu_of_expert_to_phy2log(gpu_LE, G)
    per_gpu_extra = R // G
    trans = graph.trans_LEE.astype(np.float64)
    load = graph.load_LE.astype(np.float64)
    eps = spec.balance_eps
    H_LEG = np.zeros((L, E, G), dtype=np.int64)
    H_LEG[np.repeat(np.arange(L), E), np.tile(np.arange(E), L), gpu_LE.reshape(-1)] = 1
    for l in range(L):
        w_EG = np.zeros((E, G))
        if l > 0:
            hp_EG = (H_LEG[l - 1] > 0).astype(np.float64)
            hc_EG = (H_LEG[l] > 0).astype(np.float64)
            done_EE = (hp_EG @ hc_EG.T) > 0  # pair (i at l-1, e at l) already shares a GPU
            w_EG += (trans[l - 1] * ~done_EE).T @ hp_EG
        if l < L - 1:
            hc_EG = (H_LEG[l] > 0).astype(np.float64)
            hn_EG = (H_LEG[l + 1] > 0).astype(np.float64)
            done_EE = (hc_EG @ hn_EG.T) > 0
            w_EG += (trans[l] * ~done_EE) @ hn_EG
        limit = (1.0 + eps * 0.5) * load[l].sum() / G
        bw = float(spec.options.get("replica_balance_weight", 0.0))
        free_G = np.full(G, per_gpu_extra, dtype=np.int64)
        H_LEG[l] = replicate_layer(load[l], H_LEG[l], free_G, w_EG, limit, bw)
    return holders_to_phy2log(H_LEG, gpu_LE, per_gpu_extra)


def holders_to_phy2log(H_LEG: np.ndarray, gpu_LE: np.ndarray, per_gpu_extra: int) -> np.ndarray:
    """Lay out slots GPU by GPU: the GPU's base experts (gpu_LE) first, then its replicas."""
    L, E, G = H_LEG.shape
    base_LP = gpu_of_expert_to_phy2log(gpu_LE, G).reshape(L, G, E // G)
    extra_LE_G = H_LEG.copy()
    extra_LE_G[np.repeat(np.arange(L), E), np.tile(np.arange(E), L), gpu_LE.reshape(-1)] -= 1
    # experts with a replica on g, in expert order, per (l, g)
    order = np.argsort(-extra_LE_G.transpose(0, 2, 1), axis=2, kind="stable")[:, :, :per_gpu_extra]
    return np.concatenate([base_LP, order], axis=2).reshape(L, -1).astype(np.int64)
