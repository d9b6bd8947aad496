"""Robust load model: balance that holds on unseen prompts, not only on the training trace.

A placement fitted to one trace can look balanced on it and still be unbalanced on new prompts: the optimiser
exploits sampling noise, and affinity placement groups experts whose loads rise and fall together (the same
topic hits them in every layer). So a bin (GPU or node) is judged by a chance constraint on its share of the
layer's load on unseen traffic:

    ratio_b = B * (x_b . p + kappa * sqrt(x_b' M x_b))  <=  1 + eps

where p_E is each expert's share of the layer load in training, x_b the bin's indicator (replicas: 1/count),
and M_EE the covariance of (unseen share - training share) for an unseen trace ``holdout_ratio`` times the
training size. Prompts are the sampling unit and their lengths are heavy-tailed (on the DeepSeek-V2-Lite dev
trace the 10 longest of 999 prompts carry 22% of the tokens and 60% of the variance), so M is the
ratio-estimator variance over S disjoint prompt folds, from residual load vectors r_s = f_s - n_s * p:

    M = (1 + 1 / holdout_ratio) * S / (S - 1) * sum_s r_s r_s' / N^2        (N = total load)

``predict_unseen_imbalance`` turns the same folds into a forecast of a plan's imbalance_max on unseen prompts:
a fold bootstrap (heavy tails and cross-layer co-movement kept), deviations scaled to the unseen size.

Dimension key: L layers, E experts, S prompt folds, B bins, D bootstrap draws, G GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from placement.graph import RoutingGraph, nonempty_folds, unseen_share_draws
from placement.plan import Plan


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
        return cls.from_fold_loads(graph.load_LE, graph.fold_load_SLE, kappa, holdout_ratio, copies_LE)

    @classmethod
    def from_fold_loads(
        cls,
        load_LE: np.ndarray,
        fold_load_SLE: np.ndarray | None,
        kappa: float = 2.0,
        holdout_ratio: float = 1.0,
        copies_LE: np.ndarray | None = None,
    ) -> LoadModel:
        """Model of the primary copy of each expert: with ``copies_LE`` copies an expert's load is split that
        many ways, and shares are relative to the primaries' total (the replicas are placed afterwards).
        Without folds (or kappa = 0) the model is the training share alone."""
        load_LE = np.asarray(load_LE, dtype=np.float64)
        div_LE = np.ones(load_LE.shape) if copies_LE is None else copies_LE.astype(np.float64)
        tot_L1 = np.maximum(load_LE.sum(axis=1, keepdims=True), 1e-12)
        scale_L1 = tot_L1 / np.maximum((load_LE / div_LE).sum(axis=1, keepdims=True), 1e-12)
        div_LE = div_LE / scale_L1
        share_LE = load_LE / tot_L1 / div_LE
        L, E = share_LE.shape
        f_SLE = None if fold_load_SLE is None or kappa <= 0 else nonempty_folds(fold_load_SLE)
        if f_SLE is None or f_SLE.shape[0] < 3:
            return cls(share_LE, np.zeros((L, E, E)), 0.0)
        S = f_SLE.shape[0]
        # Residuals in load units are summed, not averaged per token: a long prompt moves the shares as much
        # as many short ones together.
        res_SLE = (f_SLE - f_SLE.sum(axis=2, keepdims=True) * (load_LE / tot_L1)[None]) / div_LE
        res_LSE = np.ascontiguousarray(res_SLE.transpose(1, 0, 2))
        cov_LEE = np.matmul(res_LSE.transpose(0, 2, 1), res_LSE) * (S / (S - 1.0)) / (tot_L1[:, :, None] ** 2)
        cov_LEE *= 1.0 + 1.0 / max(holdout_ratio, 1e-9)
        return cls(share_LE, cov_LEE, float(kappa))

    def bin_ratio(self, l: int, x_EB: np.ndarray) -> np.ndarray:
        """float64 [B]: robust load ratio of each bin at layer l (x_EB: share of each expert in each bin)."""
        B = x_EB.shape[1]
        mean_B = self.share_LE[l] @ x_EB
        var_B = np.einsum("eb,ef,fb->b", x_EB, self.cov_LEE[l], x_EB)
        return np.asarray(B * (mean_B + self.kappa * np.sqrt(np.maximum(var_B, 0.0))))


def predict_unseen_imbalance(
    plan: Plan,
    load_LE: np.ndarray,
    fold_load_SLE: np.ndarray | None,
    holdout_ratio: float = 1.0,
    draws: int = 256,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Forecast of imbalance_max (../shared/METRICS.md) of a plan on an unseen trace ``holdout_ratio`` times
    the size of the one it was fitted on: quantiles over ``draws`` bootstrap resamples of the prompt folds,
    whose share deviations are scaled by sqrt(1 + 1/holdout_ratio) (training error plus unseen sampling
    error). None with fewer than 8 non-empty folds."""
    from placement.metrics import load_split

    if fold_load_SLE is None:
        return None
    f_SLE = nonempty_folds(fold_load_SLE)
    sim_DLE = unseen_share_draws(load_LE, f_SLE, holdout_ratio, draws, seed)
    if sim_DLE is None:
        return None
    gpu_DLG = np.einsum("dle,leg->dlg", sim_DLE, load_split(plan))
    imb_D = (gpu_DLG.max(axis=2) / np.maximum(gpu_DLG.mean(axis=2), 1e-12)).max(axis=1)
    q10, q50, q90 = np.quantile(imb_D, [0.1, 0.5, 0.9])
    return {
        "p10": round(float(q10), 4),
        "p50": round(float(q50), 4),
        "p90": round(float(q90), 4),
        "holdout_ratio": holdout_ratio,
        "folds": f_SLE.shape[0],
        "draws": draws,
    }
