"""Robust load model: balance that holds on unseen prompts, not only on the training trace.

A placement fitted to one trace can look balanced on it and still be unbalanced on new prompts: the optimiser
exploits sampling noise, and affinity placement groups experts whose loads rise and fall together (the same
topic hits them in every layer). So a bin (GPU or node) is judged by a chance constraint on its share of the
layer's load on unseen traffic:

    ratio_b = B * (x_b . p + kappa * sqrt(x_b' M x_b))  <=  1 + eps

where p_E is each expert's share of the layer load in training, x_b the bin's indicator (replicas: 1/count),
and M_EE the covariance of expert shares between the training trace and an unseen trace of ``holdout_ratio``
times its size, estimated from the loads of S disjoint prompt folds: M = Cov_s(share_s) * (1 + holdout)/S
for equal fold sizes (a fold of n/S prompts varies S times more than the whole trace).

Dimension key: L layers, E experts, S prompt folds, B bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.graph import RoutingGraph


@dataclass(frozen=True)
class LoadModel:
    """share_LE float64 [L, E] (rows sum to 1); cov_LEE float64 [L, E, E]; kappa >= 0."""

    share_LE: np.ndarray
    cov_LEE: np.ndarray
    kappa: float

    @classmethod
    def from_graph(
        cls,
        graph: RoutingGraph,
        kappa: float = 2.0,
        holdout_ratio: float = 1.0,
        copies_LE: np.ndarray | None = None,
    ) -> LoadModel:
        """Model of the primary copy of each expert: with ``copies_LE`` copies an expert's load is split that
        many ways, and shares are relative to the primaries' total (the replicas are placed afterwards)."""
        div_LE = np.ones(graph.load_LE.shape) if copies_LE is None else copies_LE.astype(np.float64)
        load_LE = graph.load_LE.astype(np.float64)
        tot_L1 = np.maximum(load_LE.sum(axis=1, keepdims=True), 1e-12)
        scale_L1 = tot_L1 / np.maximum((load_LE / div_LE).sum(axis=1, keepdims=True), 1e-12)
        div_LE = div_LE / scale_L1
        share_LE = load_LE / tot_L1 / div_LE
        L, E = share_LE.shape
        folds = graph.fold_load_SLE
        if folds is None or folds.shape[0] < 3 or kappa <= 0:
            return cls(share_LE, np.zeros((L, E, E)), 0.0)
        f_SLE = folds.astype(np.float64)
        tot_SL = f_SLE.sum(axis=2, keepdims=True)
        keep_S = (tot_SL[:, :, 0] > 0).all(axis=1)
        f_SLE, tot_SL = f_SLE[keep_S], tot_SL[keep_S]
        S = f_SLE.shape[0]
        if S < 3:
            return cls(share_LE, np.zeros((L, E, E)), 0.0)
        d_SLE = (f_SLE / tot_SL - (load_LE / tot_L1)[None]) / div_LE
        # Fold sizes differ: weight each fold's deviation by its size (variance ~ 1 / size).
        w_S = tot_SL[:, 0, 0] / tot_SL[:, 0, 0].mean()
        cov_LEE = np.einsum("s,sle,slf->lef", w_S, d_SLE, d_SLE) / (S - 1)
        cov_LEE *= (1.0 + holdout_ratio) / S
        return cls(share_LE, cov_LEE, float(kappa))

    def bin_ratio(self, l: int, x_EB: np.ndarray) -> np.ndarray:
        """float64 [B]: robust load ratio of each bin at layer l (x_EB: share of each expert in each bin)."""
        B = x_EB.shape[1]
        mean_B = self.share_LE[l] @ x_EB
        var_B = np.einsum("eb,ef,fb->b", x_EB, self.cov_LEE[l], x_EB)
        return np.asarray(B * (mean_B + self.kappa * np.sqrt(np.maximum(var_B, 0.0))))
