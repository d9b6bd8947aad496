"""The robustness kappa set online from the balance slack (placement/replan/memory.py): what the record measures,
the kappa it sets, that decide plans at it, and that a checkpoint keeps it."""

from __future__ import annotations

import numpy as np
import pytest

from placement.graph import PROMPT_FOLDS, RoutingGraph, graph_from_routes
from placement.metrics import imbalance_of_loads
from placement.plan import Plan
from placement.replan import MemoryChoice, decide_on_memories
from placement.replan.memory import LOW_KAPPA, SLACK_DECISIONS, SLACK_THRESHOLD
from placement.replan.policy import KAPPA
from placement.replan.solve import eplb_plan
from placement.replan.step import STEP_KAPPA
from placement.trace.synthetic import synthetic_trace


def window(seed: int) -> RoutingGraph:
    meta, r = synthetic_trace(6, 16, 2, 3000, num_topics=8, tokens_per_prompt=40, seed=3)
    rng = np.random.default_rng(seed)  # another sample of the same model: resampled prompts
    keep_T = np.isin(r.seq_ids_T, rng.choice(np.unique(r.seq_ids_T), 60))
    return graph_from_routes(r.expert_ids_TLK[keep_T], meta, False, r.seq_ids_T[keep_T], PROMPT_FOLDS)


def lopsided(g: RoutingGraph) -> Plan:
    """A plan that puts the hottest experts of every layer on GPU 0 (imbalance far above EPLB's)."""
    order_LE = np.argsort(-g.load_LE, axis=1)
    return Plan(4, 1, 16, g.meta.layers, order_LE, g.meta.model_name)


def test_the_slack_is_the_long_probes_imbalance_minus_the_deployed_plans() -> None:
    short, long = window(0), window(1)
    deployed = lopsided(long)
    probes = [eplb_plan(deployed, g) for g in (short, long)]
    choice = MemoryChoice().after(probes)
    assert choice.slack() is None and choice.kappa() == KAPPA  # nothing scored yet
    slacks = []
    for seed in range(2, 2 + SLACK_DECISIONS + 2):
        fresh_LE = window(seed).load_LE
        choice = choice.scored(deployed, fresh_LE).after(probes)
        mine = imbalance_of_loads(deployed, fresh_LE)[1]
        slacks.append(imbalance_of_loads(probes[1], fresh_LE)[1] - mine)
        assert choice.deployed_N[-1] == pytest.approx(mine)
        assert choice.slack() == pytest.approx(np.mean(slacks[-SLACK_DECISIONS:]))
    assert choice.slack() < -SLACK_THRESHOLD and choice.kappa() == KAPPA  # far less balanced than EPLB's: insure
    back = MemoryChoice.from_arrays(choice.arrays())  # a checkpoint keeps it
    assert back.slack() == pytest.approx(choice.slack())
    legacy = {k: v for k, v in choice.arrays().items() if k != "memory_deployed_N"}  # written before it was kept
    old = MemoryChoice.from_arrays(legacy)
    assert old.slack() is None
    again = old.scored(deployed, window(9).load_LE)  # the first score after it starts the record again
    assert again.scores_MN.shape[1] == again.deployed_N.size == 1 and again.slack() is not None


@pytest.mark.parametrize("slack", [SLACK_THRESHOLD + 0.01, SLACK_THRESHOLD - 0.001, -0.05])
def test_the_kappa_drops_only_while_the_recent_slack_is_above_the_threshold(slack: float) -> None:
    n = SLACK_DECISIONS
    scores_MN = np.tile(1.2 + 0.1 * np.arange(n), (2, 1))  # the probes' imbalance on the last n intervals
    older_MN = np.full((2, 1), 9.0)  # an older interval whose slack (9.0) must not count
    choice = MemoryChoice(np.column_stack([older_MN, scores_MN]), None, np.append(0.0, scores_MN[1] - slack))
    assert choice.slack() == pytest.approx(slack)  # the last SLACK_DECISIONS intervals only
    assert choice.kappa() == (LOW_KAPPA if slack > SLACK_THRESHOLD else KAPPA)


def test_the_target_method_plans_at_the_kappa_the_slack_sets_unless_given_one() -> None:
    short, long = window(0), window(1)
    cur = eplb_plan(lopsided(long), long)
    memories = [short, long]
    n = SLACK_DECISIONS
    roomy = MemoryChoice(np.full((2, n), 1.3), None, np.full(n, 1.2))  # 0.1 better balanced than EPLB's
    tight = MemoryChoice(np.full((2, n), 1.2), None, np.full(n, 1.2))
    for choice, want in ((roomy, LOW_KAPPA), (tight, KAPPA), (MemoryChoice(), KAPPA)):
        res, after = decide_on_memories(cur, memories, choice, np.zeros((6, 16)), time_limit=1.0, exact="off",
                                        method="target")  # fmt: skip
        assert res.info["kappa"] == want and f"[kappa {want:g}: " in res.reason  # what decide itself planned at
        assert after.pending_MLP is not None and after.deployed_N.size == choice.deployed_N.size
        step, _ = decide_on_memories(cur, memories, choice, np.zeros((6, 16)), time_limit=1.0)  # the local step's
        assert step.info["kappa"] == STEP_KAPPA == choice.planned_kappa(cur)
        assert f"[kappa {STEP_KAPPA:g}: " in step.reason
    res, _ = decide_on_memories(cur, memories, roomy, np.zeros((6, 16)), time_limit=1.0, exact="off", kappa=5.0)
    assert res.info["kappa"] == 5.0
    one, after = decide_on_memories(cur, [long], MemoryChoice(), long.load_LE, time_limit=1.0, exact="off")
    assert "memory" not in one.info and after.pending_MLP is not None and after.pending_MLP.shape[0] == 1  # one memory
