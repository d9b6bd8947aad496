"""One layer's assignment of experts to bins under the robust balance rule, shared by the affinity optimiser and
affinity-aware replication.

``assign_layer`` maximises the traffic each expert shares with a bin (exact linear assignment over bins repeated
E/B times), then ``repair_balance`` swaps experts off the worst bin until every bin's robust ratio (training share
plus kappa standard deviations on unseen prompts, placement/solvers/robust.py) is within the limit; a
load-balanced packing is the fallback when the repair cannot get there. Both stop at an optional wall-clock
``deadline`` (``time.perf_counter()`` seconds): a repair cut short still returns a valid assignment.

Dimension key: E experts (or items) of the layer, B bins (GPUs or nodes), A / C candidate experts of a swap.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from placement.solvers.baselines import balanced_packing
from placement.solvers.robust import LoadModel

_BIG = 1e18


def assign_layer(
    w_EB: np.ndarray,
    lm: LoadModel,
    l: int,
    limit: float,
    allowed_EB: np.ndarray | None = None,
    base_B: np.ndarray | None = None,
    deadline: float = float("inf"),
) -> np.ndarray:
    """Best bin of each expert at layer l: maximise sum w[e, bin(e)] with E/B experts per bin (exact linear
    assignment), then repair balance (``repair_balance``). If the repair cannot reach ``limit`` (or is cut short
    by ``deadline``), fall back to a load-balanced packing whose bins are renamed to fit the neighbours best,
    when that is better balanced. ``allowed_EB`` restricts experts to some bins; ``base_B`` is load share
    already on each bin. int64 [E]."""
    E, B = w_EB.shape
    cap = E // B
    cost_ES = -np.repeat(w_EB, cap, axis=1)
    if allowed_EB is not None:
        cost_ES = np.where(np.repeat(allowed_EB, cap, axis=1), cost_ES, _BIG)
    _, slot_E = linear_sum_assignment(cost_ES)
    bin_E = repair_balance(slot_E // cap, w_EB, lm, l, limit, allowed_EB, base_B, deadline)
    worst = _worst_ratio(bin_E, lm, l, base_B, B)
    if worst <= limit + 1e-9 or base_B is not None:
        return bin_E
    packed_E = _packed_layer(w_EB, lm.share_LE[l], allowed_EB)
    packed_E = repair_balance(packed_E, w_EB, lm, l, limit, allowed_EB, None, deadline)
    return packed_E if _worst_ratio(packed_E, lm, l, None, B) < worst - 1e-9 else bin_E


def _packed_layer(w_EB: np.ndarray, share_E: np.ndarray, allowed_EB: np.ndarray | None) -> np.ndarray:
    """Load-balanced packing (heaviest first into the lightest bin) of each group of experts allowed on the same
    bins (all experts, or those of one node), with packs renamed to the bins that fit the neighbours best."""
    E, B = w_EB.shape
    allowed = np.ones((E, B), dtype=bool) if allowed_EB is None else allowed_EB
    rows_GB, group_E = np.unique(allowed, axis=0, return_inverse=True)
    bin_E = np.zeros(E, dtype=np.int64)
    for k, row_B in enumerate(rows_GB):
        e_X, b_Y = np.flatnonzero(group_E.reshape(-1) == k), np.flatnonzero(row_B)
        pack_X = balanced_packing(share_E[e_X][None, :], b_Y.size)[0][0]
        onehot_XY = np.zeros((e_X.size, b_Y.size))
        onehot_XY[np.arange(e_X.size), pack_X] = 1.0
        _, name_Y = linear_sum_assignment(-(onehot_XY.T @ w_EB[np.ix_(e_X, b_Y)]))
        bin_E[e_X] = b_Y[name_Y[pack_X]]
    return bin_E


def _worst_ratio(bin_E: np.ndarray, lm: LoadModel, l: int, base_B: np.ndarray | None, B: int) -> float:
    X_EB = np.zeros((bin_E.size, B))
    X_EB[np.arange(bin_E.size), bin_E] = 1.0
    return float((lm.bin_ratio(l, X_EB) + (0.0 if base_B is None else B * base_B)).max())


def repair_balance(
    bin_E: np.ndarray,
    w_EB: np.ndarray,
    lm: LoadModel,
    l: int,
    limit: float,
    allowed_EB: np.ndarray | None = None,
    base_B: np.ndarray | None = None,
    deadline: float = float("inf"),
) -> np.ndarray:
    """Swap experts off the worst bin until every bin's robust ratio is <= ``limit`` (or no swap helps, or the
    wall clock passes ``deadline``).

    Each step takes, among swaps (a on the worst bin, b on another bin h) that leave both bins below the worst
    ratio, the one losing the least score per unit of ratio reduced. Vectorised over all candidate pairs.
    """
    E, B = w_EB.shape
    bin_E = np.asarray(bin_E, dtype=np.int64).copy()
    p_E, M_EE, kap = lm.share_LE[l], lm.cov_LEE[l], lm.kappa
    X_EB = np.zeros((E, B))
    X_EB[np.arange(E), bin_E] = 1.0
    mean_B = p_E @ X_EB + (0.0 if base_B is None else base_B)
    U_BE = (M_EE @ X_EB).T  # U[b, e] = (M x_b)[e]
    var_B = (U_BE * X_EB.T).sum(axis=1)
    diag_E = np.diag(M_EE)
    for _ in range(4 * E):
        ratio_B = B * (mean_B + kap * np.sqrt(np.maximum(var_B, 0.0)))
        hot = int(np.argmax(ratio_B))
        worst = float(ratio_B[hot])
        if worst <= limit + 1e-12 or time.perf_counter() > deadline:
            break
        a_A = np.flatnonzero(bin_E == hot)
        b_C = np.flatnonzero(bin_E != hot)
        h_C = bin_E[b_C]
        dmean_AC = p_E[b_C][None, :] - p_E[a_A][:, None]
        r_hot_AC = B * (mean_B[hot] + dmean_AC)
        r_h_AC = B * (mean_B[h_C][None, :] - dmean_AC)
        if kap > 0:  # the variance terms (skipped when only the training share counts)
            pair_AC = diag_E[a_A][:, None] + diag_E[b_C][None, :] - 2.0 * M_EE[np.ix_(a_A, b_C)]
            var_hot_AC = var_B[hot] - 2.0 * U_BE[hot, a_A][:, None] + 2.0 * U_BE[hot, b_C][None, :] + pair_AC
            var_h_AC = var_B[h_C][None, :] + 2.0 * U_BE[h_C][:, a_A].T - 2.0 * U_BE[h_C, b_C][None, :] + pair_AC
            r_hot_AC = r_hot_AC + B * kap * np.sqrt(np.maximum(var_hot_AC, 0.0))
            r_h_AC = r_h_AC + B * kap * np.sqrt(np.maximum(var_h_AC, 0.0))
        new_AC = np.maximum(r_hot_AC, r_h_AC)
        ok_AC = new_AC < worst - 1e-12
        if allowed_EB is not None:
            ok_AC &= allowed_EB[a_A][:, h_C] & allowed_EB[b_C, hot][None, :]
        if not ok_AC.any():
            break
        loss_AC = (w_EB[a_A, hot][:, None] + w_EB[b_C, h_C][None, :]) - (w_EB[a_A][:, h_C] + w_EB[b_C, hot][None, :])
        score_AC = np.where(ok_AC, loss_AC / np.maximum(worst - np.maximum(new_AC, limit), 1e-12), np.inf)
        ai, ci = np.unravel_index(int(np.argmin(score_AC)), score_AC.shape)
        a, b, h = int(a_A[ai]), int(b_C[ci]), int(h_C[ci])
        bin_E[a], bin_E[b] = h, hot
        X_EB[a, hot], X_EB[a, h], X_EB[b, h], X_EB[b, hot] = 0.0, 1.0, 0.0, 1.0
        mean_B[hot] += dmean_AC[ai, ci]
        mean_B[h] -= dmean_AC[ai, ci]
        if kap > 0:
            var_B[hot], var_B[h] = var_hot_AC[ai, ci], var_h_AC[ai, ci]
            U_BE[hot] += M_EE[b] - M_EE[a]
            U_BE[h] += M_EE[a] - M_EE[b]
    return bin_E
