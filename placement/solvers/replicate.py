"""Affinity-aware replication: fill redundant slots with copies that relieve load *and* co-locate traffic.

Which experts get extra copies is decided by their load on unseen traffic (training share plus one standard
deviation across prompt folds; ``replica_counts``): hot experts (over a quarter of a GPU's mean share and four
times the layer's mean expert) first, cut below that per copy and then spread over every GPU as copies allow
(in skewed top-1 models a 99.9 % expert takes a copy on every GPU), then the most load per copy, so that among
similar experts those whose load swings with the prompt mix come first. No expert gets more copies than GPUs.
Where each extra copy goes is decided by affinity: layer by layer (so that copies at layer l count when layer l+1 is
filled), the copies are assigned to the GPUs' redundant slots by a linear assignment maximising the transition
traffic they newly co-locate with the experts (and copies) at layers l-1 and l+1 on that GPU, then balance is
repaired with swaps (``robust_repair`` judges primaries and copies together on unseen prompts when a robustness
kappa is asked). Two copies of one expert never share a GPU (``separate_slots``). Load is shared equally among
copies, as ../shared/METRICS.md defines.

Dimension key: L layers, E experts, G GPUs, P slots, C extra copies of one layer (= P - E).
"""

from __future__ import annotations

import numpy as np

from placement.graph import RoutingGraph
from placement.plan import gpu_of_expert_to_phy2log
from placement.solvers.base import PlanSpec
from placement.solvers.deadline import check_deadline
from placement.solvers.layer_assign import assign_layer, repair_balance
from placement.solvers.robust import LoadModel

REPLICA_HOT = 0.25
REPLICA_HOT_OVER_MEAN = 4.0


def replica_counts(graph: RoutingGraph, spec: PlanSpec, spread_z: float = 1.0, hot: float | None = None) -> np.ndarray:
    """int64 [L, E]: copies of each expert (>= 1, summing to E + redundant per layer).

    An expert's unseen-traffic load is its share plus z standard deviations of its share on unseen prompts as
    large as the fitted ones (from the prompt folds, placement/solvers/robust.py; 0 without folds). Experts
    whose load is over ``hot`` (default ``spec.options["replica_hot"]``, else REPLICA_HOT) times a GPU's mean
    share 1/G, and over REPLICA_HOT_OVER_MEAN times the mean expert's 1/E, are hot: outliers, as a skewed
    router makes them (on DeepSeek-V2-Lite, whose busiest expert is at most 2.6 times the mean, spreading its
    busiest experts over 16 GPUs cost colocation and held-out balance: its packing of 4 experts per GPU needs
    the copies to split the heaviest ones). Copies go (1) to a hot expert whose load per copy is still over the
    first line, most per copy first (a lump that keeps a GPU from balancing); (2) to the hottest expert not yet
    on every GPU: a copy co-locates traffic in proportion to its expert's share, whatever its count, and an
    expert on every GPU gives each GPU 1/G of its load, prompt swings included, so it is both balanced and
    local to all its transitions (skewed top-1 benchmark, docs/benchmarks.md: the default at 1.30x eplb's
    colocation instead of 1.25x, held-out imbalance the same within its noise; a second skewed model whose
    busiest experts sit at 0.2-0.44 of a GPU's share: +0.02 colocation at fixed kappa); (3) to the most load per copy,
    as EPLB does (``hot`` = inf: always). No expert gets more copies than GPUs (a second copy on one GPU adds
    no capacity under ../shared/METRICS.md); slots left over then go to the next in line.
    """
    E, G, R = graph.num_experts, spec.num_gpus, spec.num_redundant
    hot = float(spec.options.get("replica_hot", REPLICA_HOT)) if hot is None else hot
    load_LE = graph.load_LE.astype(np.float64)
    share_LE = load_LE / np.maximum(load_LE.sum(axis=1, keepdims=True), 1e-12)
    lm = LoadModel.from_graph(graph, kappa=1.0)
    sd_LE = np.sqrt(np.maximum(np.diagonal(lm.cov_LEE, axis1=1, axis2=2), 0.0))
    weight_LE = share_LE + spread_z * sd_LE
    hot_LE = (weight_LE > hot / G) & (share_LE > REPLICA_HOT_OVER_MEAN / E)
    count_LE = np.ones(load_LE.shape, dtype=np.int64)
    rows_L = np.arange(load_LE.shape[0])
    for _ in range(min(R, E * (G - 1))):
        open_LE = count_LE < G
        per_copy_LE = np.where(open_LE, weight_LE / count_LE, -np.inf)
        lump_LE = hot_LE & (per_copy_LE > hot / G)
        spread_LE = np.where(hot_LE & open_LE, weight_LE, -np.inf)
        pick_L = np.where(
            lump_LE.any(axis=1),
            np.argmax(np.where(lump_LE, per_copy_LE, -np.inf), axis=1),
            np.where(np.isfinite(spread_LE.max(axis=1)), np.argmax(spread_LE, axis=1), np.argmax(per_copy_LE, axis=1)),
        )
        count_LE[rows_L, pick_L] += 1
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
    return separate_slots(holders_to_phy2log(H_LEG, gpu_LE, R // G), load_LE, G)


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


def distinct_copies(phy2log_LP: np.ndarray, load_LE: np.ndarray, num_gpus: int) -> np.ndarray:
    """phy2log int64 [L, P] with every second copy of an expert on one GPU (EPLB places them; under
    ../shared/METRICS.md they add no capacity) replaced by a copy of an expert that GPU lacks: the one that
    leaves the layer's busiest GPU least loaded. Holder sets only grow, so colocation never drops."""
    out = np.asarray(phy2log_LP, dtype=np.int64).copy()
    L, P = out.shape
    E, G = load_LE.shape[1], num_gpus
    gpu_P = np.arange(P) // (P // G)
    for l in range(L):
        H_EG = np.zeros((E, G), dtype=np.int64)
        np.add.at(H_EG, (out[l], gpu_P), 1)
        if H_EG.max() <= 1:
            continue
        w_E = load_LE[l].astype(np.float64)
        for p in range(P):
            e, g = int(out[l, p]), int(gpu_P[p])
            if H_EG[e, g] <= 1:
                continue
            held_EG = (H_EG > 0).astype(np.float64)
            n_E = held_EG.sum(axis=1)
            gpu_G = (w_E / n_E) @ held_EG
            # a copy of f on g: g gains w_f / (n_f + 1); f's other holders drop from w_f / n_f to that
            per_new_E = w_E / (n_E + 1.0)
            new_EG = gpu_G[None, :] + held_EG * (per_new_E - w_E / n_E)[:, None]
            new_EG[:, g] += per_new_E
            worst_E = np.where(held_EG[:, g] > 0, np.inf, new_EG.max(axis=1))
            f = int(np.argmin(worst_E))
            if not np.isfinite(worst_E[f]):
                continue
            H_EG[e, g] -= 1
            H_EG[f, g] += 1
            out[l, p] = f
    return out


def robust_repair(
    phy2log_LP: np.ndarray,
    trans_XEE: np.ndarray,
    lm: LoadModel,
    num_gpus: int,
    limit: float,
    deadline: float = float("inf"),
) -> np.ndarray:
    """phy2log int64 [L, P] with single-copy experts swapped between GPUs until every GPU's robust ratio is
    within ``limit`` (or no swap helps, or the wall clock passes ``deadline``), least co-located traffic lost
    first. The ratio counts every slot: a
    copy carries 1/copies of its expert's share and of its unseen-prompt deviation, so replicas and primaries
    are judged together (``lm``: shares and covariance of whole experts, placement/solvers/robust.py).
    Experts with several copies stay where they are, so no GPU ever gets two copies of one expert."""
    out = np.asarray(phy2log_LP, dtype=np.int64).copy()
    for l in range(out.shape[0]):
        check_deadline("robust replica repair")  # a caller's hard limit (placement/solvers/deadline.py)
        out[l] = repair_layer_slots(out, l, trans_XEE, lm, num_gpus, limit, deadline)
    return out


def repair_layer_slots(
    phy2log_LP: np.ndarray,
    l: int,
    trans_XEE: np.ndarray,
    lm: LoadModel,
    num_gpus: int,
    limit: float,
    deadline: float = float("inf"),
) -> np.ndarray:
    """int64 [P]: layer ``l`` of ``phy2log_LP`` with its single-copy experts swapped between GPUs until every
    GPU's robust ratio is within ``limit`` (``repair_balance``: least traffic co-located with layers l-1 and l+1
    lost per unit of ratio), a copy carrying 1/copies of its expert's share and deviation; multi-copy experts
    stay on their GPUs."""
    L, P = phy2log_LP.shape
    E, G = lm.share_LE.shape[1], num_gpus
    gpu_P = np.arange(P) // (P // G)
    e_P = phy2log_LP[l]
    n_E = np.bincount(e_P, minlength=E)
    inv_P = 1.0 / n_E[e_P]
    cov_PP = lm.cov_LEE[l][np.ix_(e_P, e_P)] * inv_P[:, None] * inv_P[None, :]
    slots = LoadModel((lm.share_LE[l][e_P] * inv_P)[None, :], cov_PP[None], lm.kappa)
    w_PG = np.zeros((P, G))
    for k in (l - 1, l + 1):
        if 0 <= k < L:
            held_EG = np.zeros((E, G))
            held_EG[phy2log_LP[k], gpu_P] = 1.0
            w_PG += ((trans_XEE[k].T if k < l else trans_XEE[l]) @ held_EG)[e_P]
    allowed_PG = (n_E[e_P] == 1)[:, None] | (gpu_P[:, None] == np.arange(G)[None, :])
    new_gpu_P = repair_balance(gpu_P, w_PG, slots, 0, limit, allowed_PG, None, deadline)
    return e_P[np.argsort(new_gpu_P, kind="stable")]


def separate_slots(phy2log_LP: np.ndarray, load_LE: np.ndarray, num_gpus: int) -> np.ndarray:
    """phy2log int64 [L, P] in which no GPU holds two copies of one expert: each second copy swaps slots with an
    expert of another GPU (which lacks the copy's expert, while the copy's GPU lacks that expert), the swap that
    leaves the layer's busiest GPU least loaded (loads as ../shared/METRICS.md splits them; all candidate swaps
    scored at once, Q of them)."""
    out = np.asarray(phy2log_LP, dtype=np.int64).copy()
    L, P = out.shape
    E, G = load_LE.shape[1], num_gpus
    gpu_P = np.arange(P) // (P // G)
    for l in range(L):
        w_E = np.asarray(load_LE[l], dtype=np.float64)
        for _ in range(P):
            H_EG = np.zeros((E, G), dtype=np.int64)
            np.add.at(H_EG, (out[l], gpu_P), 1)
            dup_P = np.flatnonzero(H_EG[out[l], gpu_P] > 1)
            if dup_P.size == 0:
                break
            p = int(dup_P[0])
            e, g = int(out[l, p]), int(gpu_P[p])
            q_Q = np.flatnonzero((H_EG[e, gpu_P] == 0) & (H_EG[out[l], g] == 0) & (gpu_P != g))
            if q_Q.size == 0:
                break
            held_EG = (H_EG > 0).astype(np.float64)
            n_E = np.maximum(held_EG.sum(axis=1), 1.0)
            # e gains GPU h (its copies now share w_e n_e + 1 ways); f = the expert of slot q moves from h to g,
            # or, when it has a second copy on h, gains g (n_f + 1 ways)
            h_Q, f_Q, rows_Q = gpu_P[q_Q], out[l, q_Q], np.arange(q_Q.size)
            we_new = w_E[e] / (n_E[e] + 1.0)
            new_QG = np.tile((w_E / n_E) @ held_EG + held_EG[e] * (we_new - w_E[e] / n_E[e]), (q_Q.size, 1))
            new_QG[rows_Q, h_Q] += we_new
            wf_Q, nf_Q = w_E[f_Q], n_E[f_Q]
            single_Q = H_EG[f_Q, h_Q] == 1
            new_QG[rows_Q, h_Q] -= np.where(single_Q, wf_Q / nf_Q, 0.0)
            new_QG += np.where(single_Q, 0.0, wf_Q / (nf_Q + 1.0) - wf_Q / nf_Q)[:, None] * held_EG[f_Q]
            new_QG[:, g] += np.where(single_Q, wf_Q / nf_Q, wf_Q / (nf_Q + 1.0))
            q = int(q_Q[int(np.argmin(new_QG.max(axis=1)))])
            out[l, p], out[l, q] = out[l, q], out[l, p]
    return out
