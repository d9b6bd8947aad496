"""Swap annealing for layer-chain placement (compiled with numba; O(1) per move).

State: bin_LE (GPU of each expert) with E/G experts per GPU. A move swaps experts a and b of one layer l that sit
on GPUs p != q. ``W_LEG[l, e, g]`` holds the traffic between e and the experts on GPU g at layers l-1 and l+1,
so a move's gain is read off W in O(G/N) and W is updated in O(E) after an accepted move.

Value of a pair (i at l, j at l+1): ``gpu_w`` if they share a GPU plus ``node_w`` if they share a node
(with N = 1 every GPU is on one node and only ``gpu_w`` matters).

Balance: loads of S prompt folds ``load_SLE`` with limits ``limit_SL`` (robust to which prompts come). A move
is allowed when neither GPU goes over its limit in any fold, or when it lowers the worse of the two GPUs.

Dimension key: L layers, E experts, G GPUs, S load folds.
"""

from __future__ import annotations

import numba
import numpy as np


def neighbour_weights(bin_LE: np.ndarray, trans_XEE: np.ndarray, num_gpus: int) -> np.ndarray:
    """W_LEG float64 [L, E, G] for the current placement."""
    L, E = bin_LE.shape
    W = np.zeros((L, E, num_gpus))
    onehot_LEG = np.zeros((L, E, num_gpus))
    onehot_LEG[np.repeat(np.arange(L), E), np.tile(np.arange(E), L), bin_LE.reshape(-1)] = 1.0
    if L > 1:
        W[1:] += np.einsum("xie,xig->xeg", trans_XEE, onehot_LEG[:-1])
        W[:-1] += np.einsum("xej,xjg->xeg", trans_XEE, onehot_LEG[1:])
    return W


@numba.njit(cache=True, nogil=True)
def _worst_ratio(binload_SLG: np.ndarray, limit_SL: np.ndarray, l: int, g: int) -> float:  # pragma: no cover
    r = 0.0
    for s in range(binload_SLG.shape[0]):
        v = binload_SLG[s, l, g] / limit_SL[s, l]
        if v > r:
            r = v
    return r


@numba.njit(cache=True, nogil=True)
def anneal(
    bin_LE: np.ndarray,
    W_LEG: np.ndarray,
    trans_XEE: np.ndarray,
    load_SLE: np.ndarray,
    limit_SL: np.ndarray,
    node_G: np.ndarray,
    gpu_w: float,
    node_w: float,
    iters: int,
    temp0: float,
    temp1: float,
    seed: int,
) -> float:  # pragma: no cover - compiled
    """Anneal in place; returns the total gain of accepted moves (value units)."""
    np.random.seed(seed)
    S, L, E = load_SLE.shape
    G = W_LEG.shape[2]
    binload_SLG = np.zeros((S, L, G))
    for s in range(S):
        for l in range(L):
            for e in range(E):
                binload_SLG[s, l, bin_LE[l, e]] += load_SLE[s, l, e]
    total = 0.0
    ratio = (temp1 / temp0) ** (1.0 / max(iters, 1))
    temp = temp0
    for it in range(iters):
        temp *= ratio
        l = np.random.randint(L)
        a = np.random.randint(E)
        b = np.random.randint(E)
        p = bin_LE[l, a]
        q = bin_LE[l, b]
        if p == q:
            continue
        gain = gpu_w * (W_LEG[l, a, q] + W_LEG[l, b, p] - W_LEG[l, a, p] - W_LEG[l, b, q])
        if node_w != 0.0 and node_G[p] != node_G[q]:
            na = 0.0
            for g in range(G):
                if node_G[g] == node_G[q]:
                    na += W_LEG[l, a, g] - W_LEG[l, b, g]
                elif node_G[g] == node_G[p]:
                    na += W_LEG[l, b, g] - W_LEG[l, a, g]
            gain += node_w * na
        if gain < 0.0 and np.random.random() >= np.exp(gain / temp):
            continue
        # balance check over folds
        old_worst = max(_worst_ratio(binload_SLG, limit_SL, l, p), _worst_ratio(binload_SLG, limit_SL, l, q))
        new_worst = 0.0
        for s in range(S):
            d = load_SLE[s, l, b] - load_SLE[s, l, a]
            vp = (binload_SLG[s, l, p] + d) / limit_SL[s, l]
            vq = (binload_SLG[s, l, q] - d) / limit_SL[s, l]
            new_worst = max(new_worst, vp, vq)
        if new_worst > 1.0 + 1e-12 and new_worst >= old_worst:
            continue
        for s in range(S):
            d = load_SLE[s, l, b] - load_SLE[s, l, a]
            binload_SLG[s, l, p] += d
            binload_SLG[s, l, q] -= d
        bin_LE[l, a] = q
        bin_LE[l, b] = p
        total += gain
        if l > 0:
            for i in range(E):
                t_a = trans_XEE[l - 1, i, a]
                t_b = trans_XEE[l - 1, i, b]
                W_LEG[l - 1, i, p] += t_b - t_a
                W_LEG[l - 1, i, q] += t_a - t_b
        if l < L - 1:
            for j in range(E):
                t_a = trans_XEE[l, a, j]
                t_b = trans_XEE[l, b, j]
                W_LEG[l + 1, j, p] += t_b - t_a
                W_LEG[l + 1, j, q] += t_a - t_b
    return total
