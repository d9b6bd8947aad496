"""Robust load model and unseen-imbalance forecast, checked against fresh draws from a known prompt process.

Prompts have a topic (its own expert distribution) and a heavy-tailed length (Pareto, as in real chat traces),
so the variance of expert shares on unseen prompts is dominated by long prompts: the estimator must weigh
prompts, not tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from placement.plan import Plan
from placement.solvers.robust import LoadModel, predict_unseen_imbalance

E, L, K, TOPICS = 16, 2, 2, 3


class PromptProcess:
    def __init__(self, seed: int, alpha: float = 1.5) -> None:
        self.rng = np.random.default_rng(seed)
        self.topic_ZE = self.rng.dirichlet(np.full(E, 0.3), size=TOPICS)
        self.alpha = alpha

    def loads(self, n: int) -> np.ndarray:
        """int64 [n, L, E]: expert loads of n prompts."""
        len_N = np.minimum((self.rng.pareto(self.alpha, n) + 1) * 8, 4000).astype(np.int64)
        z_N = self.rng.integers(0, TOPICS, n)
        return np.stack([self.rng.multinomial(len_N * K, self.topic_ZE[z_N]) for _ in range(L)], axis=1)

    def folds(self, c_NLE: np.ndarray, S: int = 64) -> np.ndarray:
        f_SLE = np.zeros((S, L, E), dtype=np.int64)
        np.add.at(f_SLE, self.rng.integers(0, S, len(c_NLE)), c_NLE)
        return f_SLE


def share(c_NLE: np.ndarray) -> np.ndarray:
    tot_LE = c_NLE.sum(axis=0).astype(np.float64)
    return tot_LE / tot_LE.sum(axis=1, keepdims=True)


def test_share_covariance_matches_unseen_prompts_with_heavy_tailed_lengths() -> None:
    proc = PromptProcess(0)
    x_E = np.zeros(E)
    x_E[np.argsort(-proc.topic_ZE[0])[:4]] = 1.0  # a bin holding topic 0's favourite experts
    dev, pred = [], []
    for rep in range(600):
        fit, unseen = proc.loads(400), proc.loads(400)
        dev.append(x_E @ (share(unseen)[0] - share(fit)[0]))
        if rep < 120:
            lm = LoadModel.from_fold_loads(fit.sum(axis=0), proc.folds(fit), kappa=1.0, holdout_ratio=1.0)
            pred.append(x_E @ lm.cov_LEE[0] @ x_E)
    ratio = float(np.mean(pred) / np.var(dev))
    # Measured 0.73-0.83 over six seeds (the rarest, longest prompts are seldom in one training sample);
    # weighting the folds by tokens (the obvious estimator) gives about 0.3 here.
    assert 0.6 < ratio < 1.3, ratio


def test_holdout_ratio_scales_the_unseen_part_only() -> None:
    proc = PromptProcess(1)
    c = proc.loads(300)
    f = proc.folds(c)
    m1 = LoadModel.from_fold_loads(c.sum(axis=0), f, holdout_ratio=1.0).cov_LEE
    m_inf = LoadModel.from_fold_loads(c.sum(axis=0), f, holdout_ratio=1e9).cov_LEE
    m_quarter = LoadModel.from_fold_loads(c.sum(axis=0), f, holdout_ratio=0.25).cov_LEE
    np.testing.assert_allclose(m1, 2.0 * m_inf, rtol=1e-6)  # training error + as much unseen error
    np.testing.assert_allclose(m_quarter, 5.0 * m_inf, rtol=1e-6)  # a 4x smaller unseen trace varies 4x more
    assert LoadModel.from_fold_loads(c.sum(axis=0), None, kappa=2.0).kappa == 0.0


@pytest.mark.parametrize("alpha", [1.5, 3.0])
def test_unseen_imbalance_forecast_brackets_fresh_prompts(alpha: float) -> None:
    proc = PromptProcess(2, alpha)
    G = 4
    plan = Plan(G, 1, E, tuple(range(L)), np.tile(np.arange(E), (L, 1)))  # contiguous: GPU g holds 4g..4g+3
    actual, p10, p50, p90, narrow = [], [], [], [], []
    for _ in range(40):
        fit, unseen = proc.loads(400), proc.loads(400)
        folds = proc.folds(fit)
        fc = predict_unseen_imbalance(plan, fit.sum(axis=0), folds, draws=200, seed=0)
        assert fc is not None and fc["p10"] <= fc["p50"] <= fc["p90"]
        big = predict_unseen_imbalance(plan, fit.sum(axis=0), folds, holdout_ratio=1e6, draws=200, seed=0)
        assert big is not None
        narrow.append((big["p90"] - big["p10"]) / (fc["p90"] - fc["p10"]))
        gpu_LG = share(unseen).reshape(L, G, E // G).sum(axis=2)
        actual.append(float((gpu_LG.max(axis=1) * G).max()))
        p10.append(fc["p10"])
        p50.append(fc["p50"])
        p90.append(fc["p90"])
    a, lo, mid, hi = map(np.asarray, (actual, p10, p50, p90))
    inside = float(((a >= lo) & (a <= hi)).mean())
    assert 0.6 <= inside <= 0.97, inside  # nominal 0.8
    assert 0.25 <= float((a <= mid).mean()) <= 0.75
    # A far larger unseen trace varies only by the training error: its forecast range is narrower (about
    # 1/sqrt(2) of the range for an unseen trace as large as the fitted one).
    assert 0.5 < float(np.median(narrow)) < 0.85


def test_forecast_needs_prompt_folds() -> None:
    proc = PromptProcess(3)
    c = proc.loads(50)
    plan = Plan(4, 1, E, tuple(range(L)), np.tile(np.arange(E), (L, 1)))
    assert predict_unseen_imbalance(plan, c.sum(axis=0), None) is None
    assert predict_unseen_imbalance(plan, c.sum(axis=0), proc.folds(c, S=4)) is None
