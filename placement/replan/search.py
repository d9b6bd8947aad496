"""Re-planning heuristics from the current plan under a move budget (one replica per expert: gpu_LE [L, E]).

Balance is the robust load ratio of placement/solvers/robust.py per (layer, GPU), G * (share + kappa * sd) on
unseen prompts, kept <= ``limit``; the objective is co-located transition traffic; a move is one expert away
from its current GPU (../shared/METRICS.md moves, one replica each).

- ``layer_states``: each layer either stays as it is or takes the target plan's layer; a dynamic programme over
  the layer chain with the budget as a dimension picks the best mix exactly (pairs of adjacent layers score
  their co-located traffic; a layer over the limit pays a large penalty). Works with replicas too.
- ``swap_search``: best-improvement swaps of two experts of one layer on different GPUs, vectorised over all
  layers of one parity (their gains do not interact), ranked by gain per move; balance repairs first (a repair
  lowers the worse of its two GPUs' ratios over the limit), a swap never raises the worse of its two GPUs over
  the limit (so never a layer's worst), and the move count never passes the budget.

Dimension key: L layers, X layer pairs, E experts, G GPUs, S layers of one parity, Q expert pairs, K budget + 1.
"""

from __future__ import annotations

import time

import numpy as np

from placement.solvers.anneal import neighbour_weights
from placement.solvers.robust import LoadModel


def onehot_LEG(gpu_LE: np.ndarray, num_gpus: int) -> np.ndarray:
    return (gpu_LE[:, :, None] == np.arange(num_gpus)).astype(np.float64)


def robust_ratio_LG(gpu_LE: np.ndarray, lm: LoadModel, num_gpus: int) -> np.ndarray:
    """float64 [L, G]: robust load ratio of each GPU (1.0 = exactly the mean)."""
    X_LEG = onehot_LEG(gpu_LE, num_gpus)
    mean_LG = np.einsum("le,leg->lg", lm.share_LE, X_LEG)
    var_LG = np.einsum("leg,lef,lfg->lg", X_LEG, lm.cov_LEE, X_LEG)
    return np.asarray(num_gpus * (mean_LG + lm.kappa * np.sqrt(np.maximum(var_LG, 0.0))))


def colocated_X(gpu_LE: np.ndarray, trans_XEE: np.ndarray) -> np.ndarray:
    """float64 [X]: co-located transition traffic of each layer pair."""
    same_XEE = gpu_LE[:-1, :, None] == gpu_LE[1:, None, :]
    return np.asarray((trans_XEE * same_XEE).sum(axis=(1, 2)), dtype=np.float64)


def layer_states(
    cur_LEG: np.ndarray,
    tgt_LEG: np.ndarray,
    trans_XEE: np.ndarray,
    lm: LoadModel,
    limit: float | None,
    budget: int,
) -> np.ndarray:
    """Which layers take the target (1) and which stay (0): the mix with the most co-located traffic among those
    with the least robust excess over ``limit``, within ``budget`` moves (exact over these 2^L mixes). Plans are
    given as holders, bool [L, E, G] (replicas allowed; load shared equally, ../shared/METRICS.md); ``limit``
    None is the target's worst ratio. int64 [L]."""
    L = cur_LEG.shape[0]
    states = np.stack([cur_LEG, tgt_LEG]).astype(np.float64)  # [2, L, E, G]
    cost_L2 = np.stack([np.zeros(L, dtype=np.int64), (tgt_LEG & ~cur_LEG).sum(axis=(1, 2))], axis=1)
    big = float(trans_XEE.sum()) + 1.0
    split = states / np.maximum(states.sum(axis=3, keepdims=True), 1.0)
    mean_2LG = np.einsum("le,sleg->slg", lm.share_LE, split)
    var_2LG = np.einsum("sleg,lef,slfg->slg", split, lm.cov_LEE, split)
    ratio_2LG = states.shape[3] * (mean_2LG + lm.kappa * np.sqrt(np.maximum(var_2LG, 0.0)))
    limit = float(ratio_2LG[1].max()) if limit is None else limit
    excess_L2 = np.maximum(ratio_2LG - limit, 0.0).sum(axis=2).T
    # pair value of (state s at x, state t at x + 1)
    pair_X22 = np.zeros((max(L - 1, 0), 2, 2))
    for s in range(2):
        for t in range(2):
            shared_XEE = np.einsum("xig,xjg->xij", states[s, :-1], states[t, 1:]) > 0
            pair_X22[:, s, t] = (trans_XEE * shared_XEE).sum(axis=(1, 2))
    K = int(min(budget, cost_L2.sum())) + 1
    neg = -np.inf
    value_2K = np.full((2, K), neg)
    for s in range(2):
        if cost_L2[0, s] < K:
            value_2K[s, cost_L2[0, s]] = -big * excess_L2[0, s]
    back_L2K = np.zeros((L, 2, K), dtype=np.int64)
    for l in range(1, L):
        new_2K = np.full((2, K), neg)
        for t in range(2):
            c = int(cost_L2[l, t])
            if c >= K:
                continue
            cand_2K = value_2K + pair_X22[l - 1, :, t][:, None]
            best_s = np.argmax(cand_2K, axis=0)
            best_K = cand_2K[best_s, np.arange(K)]
            new_2K[t, c:] = best_K[: K - c] - big * excess_L2[l, t]
            back_L2K[l, t, c:] = best_s[: K - c]
        value_2K = new_2K
    s, k = (int(i) for i in np.unravel_index(int(np.argmax(value_2K)), value_2K.shape))
    choice_L = np.zeros(L, dtype=np.int64)
    for l in range(L - 1, -1, -1):
        choice_L[l] = s
        prev = int(back_L2K[l, s, k]) if l else 0
        k -= int(cost_L2[l, s])
        s = prev
    return choice_L


def swap_search(
    gpu_LE: np.ndarray,
    cur_LE: np.ndarray,
    trans_XEE: np.ndarray,
    lm: LoadModel,
    limit: float,
    budget: int,
    deadline: float,
    max_rounds: int = 400,
    min_gain: float = 0.0,
) -> np.ndarray:
    """Best-improvement swaps from ``gpu_LE`` (module docstring) keeping moves from ``cur_LE`` <= budget; a swap
    that repairs no balance and adds moves must co-locate at least ``min_gain`` traffic per added move."""
    gpu_LE = gpu_LE.astype(np.int64).copy()
    L, E = gpu_LE.shape
    G = int(max(gpu_LE.max(), cur_LE.max())) + 1
    trans = np.asarray(trans_XEE, dtype=np.float64)
    big = float(trans.sum()) + 1.0
    a_Q, b_Q = np.triu_indices(E, k=1)
    M_LEE = lm.cov_LEE
    diag_LE = np.diagonal(M_LEE, axis1=1, axis2=2)
    stale = 0
    for rnd in range(max_rounds):
        if time.perf_counter() > deadline:
            break
        used = int((gpu_LE != cur_LE).sum())
        layers_S = np.arange(rnd % 2, L, 2)
        S = len(layers_S)
        g_SE, c_SE = gpu_LE[layers_S], cur_LE[layers_S]
        W_SEG = neighbour_weights(gpu_LE, trans, G)[layers_S]
        X_SEG = onehot_LEG(g_SE, G)
        p_SE = lm.share_LE[layers_S]
        M_SEE = M_LEE[layers_S]
        MX_SEG = np.einsum("sef,sfg->seg", M_SEE, X_SEG)
        mean_SG = np.einsum("se,seg->sg", p_SE, X_SEG)
        var_SG = np.einsum("seg,seg->sg", X_SEG, MX_SEG)
        s_ = np.arange(S)[:, None]
        ga, gb = g_SE[:, a_Q], g_SE[:, b_Q]
        dgain = W_SEG[s_, a_Q, gb] + W_SEG[s_, b_Q, ga] - W_SEG[s_, a_Q, ga] - W_SEG[s_, b_Q, gb]
        pa, pb = p_SE[:, a_Q], p_SE[:, b_Q]
        cross = diag_LE[layers_S][:, a_Q] + diag_LE[layers_S][:, b_Q] - 2 * M_SEE[s_, a_Q, b_Q]
        var_a = var_SG[s_, ga] - 2 * MX_SEG[s_, a_Q, ga] + 2 * MX_SEG[s_, b_Q, ga] + cross
        var_b = var_SG[s_, gb] - 2 * MX_SEG[s_, b_Q, gb] + 2 * MX_SEG[s_, a_Q, gb] + cross

        def ratio(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
            return np.asarray(G * (mean + lm.kappa * np.sqrt(np.maximum(var, 0.0))))

        old_a, old_b = ratio(mean_SG[s_, ga], var_SG[s_, ga]), ratio(mean_SG[s_, gb], var_SG[s_, gb])
        new_a, new_b = ratio(mean_SG[s_, ga] - pa + pb, var_a), ratio(mean_SG[s_, gb] - pb + pa, var_b)
        # the pair's worse GPU: a swap never raises it over the limit, and a repair lowers it (lowering the pair's
        # summed excess instead can raise the layer's worst GPU: the heaviest expert handed to the other one)
        old_max, new_max = np.maximum(old_a, old_b), np.maximum(new_a, new_b)
        dexcess = np.maximum(new_max - limit, 0.0) - np.maximum(old_max - limit, 0.0)
        dmoves = (
            (gb != c_SE[:, a_Q]).astype(np.int64) + (ga != c_SE[:, b_Q]) - (ga != c_SE[:, a_Q]) - (gb != c_SE[:, b_Q])
        )  # fmt: skip
        benefit = -big * dexcess + dgain
        ok = (ga != gb) & (benefit > 1e-9) & (dexcess <= 1e-12) & (dmoves <= budget - used)
        if min_gain > 0:  # a swap that only co-locates must pay for the moves it adds
            ok &= (dexcess < -1e-12) | (dgain >= min_gain * np.maximum(dmoves, 0))
        key = np.where(ok, benefit / (np.maximum(dmoves, 0) + 1.0), -np.inf)
        best_S = np.argmax(key, axis=1)
        key_S = key[np.arange(S), best_S]
        taken = 0
        for s in np.argsort(-key_S):
            if not np.isfinite(key_S[s]):
                break
            q = best_S[s]
            dm = int(dmoves[s, q])
            if used + dm > budget:
                continue
            l, a, b = layers_S[s], a_Q[q], b_Q[q]
            gpu_LE[l, a], gpu_LE[l, b] = gpu_LE[l, b], gpu_LE[l, a]
            used += dm
            taken += 1
        stale = 0 if taken else stale + 1
        if stale >= 2 or (L == 1 and stale):
            break
    return gpu_LE
