"""Swap annealing for layer-chain placement (compiled with numba; O(1) per move).

State: bin_LE (GPU of each expert) with E/G experts per GPU. A move swaps experts a and b of one layer l that sit
on GPUs p != q. ``W_LEG[l, e, g]`` holds the traffic between e and the experts on GPU g at layers l-1 and l+1,
so a move's gain is read off W in O(G/N) and W is updated in O(E) after an accepted move.

Value of a pair (i at l, j at l+1): ``gpu_w`` if they share a GPU plus ``node_w`` if they share a node
(with N = 1 every GPU is on one node and only ``gpu_w`` matters).

Balance: the robust ratio of placement/solvers/robust.py, G * (share + kappa * sqrt(x' M x)), kept per (layer,
GPU) with the vectors U = M x so that a swap's new ratios cost O(1). A move is allowed when both GPUs stay
within ``limit``, or when it lowers the worse of the two.

Dimension key: L layers, E experts, G GPUs.
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
def anneal(
    bin_LE: np.ndarray,
    W_LEG: np.ndarray,
    trans_XEE: np.ndarray,
    share_LE: np.ndarray,
    cov_LEE: np.ndarray,
    kappa: float,
    limit: float,
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
    L, E = share_LE.shape
    G = W_LEG.shape[2]
    mean_LG = np.zeros((L, G))
    U_LGE = np.zeros((L, G, E))
    var_LG = np.zeros((L, G))
    for l in range(L):
        for e in range(E):
            g = bin_LE[l, e]
            mean_LG[l, g] += share_LE[l, e]
            if kappa > 0.0:
                for f in range(E):
                    U_LGE[l, g, f] += cov_LEE[l, e, f]
        if kappa > 0.0:
            for e in range(E):
                g = bin_LE[l, e]
                var_LG[l, g] += U_LGE[l, g, e]
    total = 0.0
    ratio = (temp1 / temp0) ** (1.0 / max(iters, 1))
    temp = temp0
    for _ in range(iters):
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
        # robust balance: accept if both GPUs stay within the limit, or the worse of the two improves
        dmean = share_LE[l, b] - share_LE[l, a]
        vp = var_LG[l, p]
        vq = var_LG[l, q]
        nvp = vp
        nvq = vq
        if kappa > 0.0:
            pair = cov_LEE[l, a, a] + cov_LEE[l, b, b] - 2.0 * cov_LEE[l, a, b]
            nvp = vp - 2.0 * U_LGE[l, p, a] + 2.0 * U_LGE[l, p, b] + pair
            nvq = vq + 2.0 * U_LGE[l, q, a] - 2.0 * U_LGE[l, q, b] + pair
        old_worst = G * max(
            mean_LG[l, p] + kappa * np.sqrt(max(vp, 0.0)), mean_LG[l, q] + kappa * np.sqrt(max(vq, 0.0))
        )
        new_worst = G * max(
            mean_LG[l, p] + dmean + kappa * np.sqrt(max(nvp, 0.0)),
            mean_LG[l, q] - dmean + kappa * np.sqrt(max(nvq, 0.0)),
        )
        if new_worst > limit + 1e-12 and new_worst >= old_worst:
            continue
        mean_LG[l, p] += dmean
        mean_LG[l, q] -= dmean
        var_LG[l, p] = nvp
        var_LG[l, q] = nvq
        if kappa > 0.0:
            for f in range(E):
                d = cov_LEE[l, b, f] - cov_LEE[l, a, f]
                U_LGE[l, p, f] += d
                U_LGE[l, q, f] -= d
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
