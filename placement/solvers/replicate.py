"""Affinity-aware replication: fill redundant slots with copies that relieve load *and* co-locate traffic.

Which experts get extra copies is decided by load (as EPLB does: the expert with the most load per copy gets
the next one), so that no single expert's share sets a GPU's pace. Where each extra copy goes is decided by
affinity: layer by layer (so that copies at layer l count when layer l+1 is filled), the copies are assigned to
the GPUs' redundant slots by a linear assignment maximising the transition traffic they newly co-locate with the
experts (and copies) at layers l-1 and l+1 on that GPU, then balance is repaired with swaps. A copy never goes
to a GPU that already holds its expert. Load is shared equally among copies, as ../shared/METRICS.md defines.

Dimension key: L layers, E experts, G GPUs, P slots, C extra copies of one layer (= P - E).
"""

from __future__ import annotations

import numpy as np

from placement.graph import RoutingGraph
from placement.plan import gpu_of_expert_to_phy2log
from placement.solvers.base import PlanSpec
from placement.solvers.baselines import replicate_hottest
from placement.solvers.layer_assign import assign_layer, repair_balance
from placement.solvers.robust import LoadModel


def replica_counts(graph: RoutingGraph, spec: PlanSpec) -> np.ndarray:
    """int64 [L, E]: copies of each expert (>= 1, summing to E + redundant per layer), hottest-first."""
    E = graph.num_experts
    _, count_LE = replicate_hottest(graph.load_LE.astype(np.float64), E + spec.num_redundant)
    return count_LE


def colocation_gain(l: int, H_LEG: np.ndarray, trans_XEE: np.ndarray) -> np.ndarray:
    """float64 [E, G]: traffic that a copy of e on GPU g would newly co-locate at layer l."""
    L, E, G = H_LEG.shape
    w_EG = np.zeros((E, G))
    hc_EG = (H_LEG[l] > 0).astype(np.float64)
    if l > 0:
        hp_EG = (H_LEG[l - 1] > 0).astype(np.float64)
        done_EE = (hp_EG @ hc_EG.T) > 0
        w_EG += (trans_XEE[l - 1] * ~done_EE).T @ hp_EG
    if l < L - 1:
        hn_EG = (H_LEG[l + 1] > 0).astype(np.float64)
        done_EE = (hc_EG @ hn_EG.T) > 0
        w_EG += (trans_XEE[l] * ~done_EE) @ hn_EG
    return w_EG


def add_replicas(
    gpu_LE: np.ndarray, graph: RoutingGraph, spec: PlanSpec, copies_LE: np.ndarray, lm: LoadModel
) -> np.ndarray:
    """phy2log int64 [L, P]: the primaries of gpu_LE plus the extra copies of ``copies_LE``."""
    L, E = gpu_LE.shape
    G, R = spec.num_gpus, spec.num_redundant
    if R == 0:
        return gpu_of_expert_to_phy2log(gpu_LE, G)
    trans = graph.trans_LEE.astype(np.float64)
    load_LE = graph.load_LE.astype(np.float64)
    share_LE = load_LE / np.maximum(load_LE.sum(axis=1, keepdims=True), 1e-12) / copies_LE
    gpu_LE = gpu_LE.copy()
    H_LEG = np.zeros((L, E, G), dtype=np.int64)
    H_LEG[np.repeat(np.arange(L), E), np.tile(np.arange(E), L), gpu_LE.reshape(-1)] = 1
    limit = 1.0 + spec.balance_eps
    for l in range(L):
        item_C = np.repeat(np.arange(E), copies_LE[l] - 1)
        w_CG = colocation_gain(l, H_LEG, trans)[item_C]
        allowed_CG = H_LEG[l][item_C] == 0
        base_G = np.bincount(gpu_LE[l], weights=share_LE[l], minlength=G)
        items = LoadModel(share_LE[l][item_C][None, :], np.zeros((1, item_C.size, item_C.size)), 0.0)
        gpu_C = assign_layer(w_CG, items, 0, limit, allowed_CG, base_G)
        gpu_C = separate_copies(item_C, gpu_C, H_LEG[l], w_CG)
        np.add.at(H_LEG[l], (item_C, gpu_C), 1)
        gpu_LE[l] = rebalance_primaries(l, gpu_LE[l], H_LEG, trans, share_LE[l], limit)
        H_LEG[l] = 0
        H_LEG[l, np.arange(E), gpu_LE[l]] = 1
        np.add.at(H_LEG[l], (item_C, gpu_C), 1)
    return holders_to_phy2log(H_LEG, gpu_LE, R // G)


def separate_copies(item_C: np.ndarray, gpu_C: np.ndarray, H_EG: np.ndarray, w_CG: np.ndarray) -> np.ndarray:
    """Move copies so that no GPU holds two copies of one expert (METRICS.md counts a GPU once, so a second copy
    there would add no capacity): swap a doubled copy with a copy on another GPU where both fit, least loss
    of co-located traffic first. H_EG: the layer's primaries (one-hot)."""
    gpu_C = gpu_C.copy()
    C = item_C.size
    for _ in range(C):
        held_EG = H_EG.copy()
        np.add.at(held_EG, (item_C, gpu_C), 1)
        dup = np.flatnonzero(held_EG[item_C, gpu_C] > 1)
        if dup.size == 0:
            break
        c = int(dup[0])
        e, g = int(item_C[c]), int(gpu_C[c])
        # partner d on GPU h: e must not be on h, and d's expert must not be on g
        ok_D = (held_EG[e, gpu_C] == 0) & (held_EG[item_C, g] == 0) & (gpu_C != g)
        if not ok_D.any():
            break
        loss_D = w_CG[c, g] + w_CG[np.arange(C), gpu_C] - w_CG[c, gpu_C] - w_CG[np.arange(C), g]
        d = int(np.argmin(np.where(ok_D, loss_D, np.inf)))
        gpu_C[c], gpu_C[d] = gpu_C[d], g
    return gpu_C


def rebalance_primaries(
    l: int, gpu_E: np.ndarray, H_LEG: np.ndarray, trans_XEE: np.ndarray, share_E: np.ndarray, limit: float
) -> np.ndarray:
    """With the extra copies of layer l placed, swap primaries between GPUs until every GPU is within ``limit``
    (cheapest in co-located traffic first). A primary never moves onto a GPU holding a copy of its expert."""
    L, E, G = H_LEG.shape
    extra_EG = H_LEG[l].copy()
    extra_EG[np.arange(E), gpu_E] -= 1
    copies_G = (share_E[:, None] * extra_EG).sum(axis=0)
    w_EG = np.zeros((E, G))
    if l > 0:
        w_EG += trans_XEE[l - 1].T @ (H_LEG[l - 1] > 0).astype(np.float64)
    if l < L - 1:
        w_EG += trans_XEE[l] @ (H_LEG[l + 1] > 0).astype(np.float64)
    primaries = LoadModel(share_E[None, :], np.zeros((1, E, E)), 0.0)
    return repair_balance(gpu_E, w_EG, primaries, 0, limit, extra_EG == 0, copies_G)


def holders_to_phy2log(H_LEG: np.ndarray, gpu_LE: np.ndarray, per_gpu_extra: int) -> np.ndarray:
    """Lay out slots GPU by GPU: the GPU's primaries (gpu_LE) first, then its extra copies."""
    L, E, G = H_LEG.shape
    base_LGS = gpu_of_expert_to_phy2log(gpu_LE, G).reshape(L, G, E // G)
    extra_LEG = H_LEG.copy()
    extra_LEG[np.repeat(np.arange(L), E), np.tile(np.arange(E), L), gpu_LE.reshape(-1)] -= 1
    extra_LGE = extra_LEG.transpose(0, 2, 1)
    # expert ids of the extra copies per (l, g), repeated by multiplicity
    out = np.empty((L, G, per_gpu_extra), dtype=np.int64)
    for l in range(L):
        for g in range(G):
            out[l, g] = np.repeat(np.arange(E), extra_LGE[l, g])
    return np.concatenate([base_LGS, out], axis=2).reshape(L, -1).astype(np.int64)
