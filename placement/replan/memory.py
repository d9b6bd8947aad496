"""Which memory of the traffic to plan on, chosen online by how well each foresaw the traffic that came next.

A short memory (the service's half-life) follows a shift of the traffic sooner; the long one (all traffic so
far, ``LONG_HALF_LIFE`` = 0: no decay) averages more prompts, so its loads are closer to the next interval's when
the traffic does not shift (on five prompt orders of DeepSeek-V2-Lite EPLB fitted on all traffic so far beat EPLB
fitted on the 2-window decayed window on four; on a synthetic topic shift it lost: docs/benchmarks.md). Neither
is right for every stream, so the service keeps both (placement/serve/service.py) and ``decide_on_memories`` lets
the traffic choose: at every decision each memory's probe, EPLB's plan fitted on that memory (a pure balancer of
its mean loads, placement/replan/solve.py ``eplb_plan``), is kept, and the next decision scores every probe's
imbalance_max on the traffic that came in between (``MemoryChoice.scored``). ``decide`` then plans on the memory
whose probes scored lower over the last ``MEMORY_DECISIONS`` scored decisions (the short one on a tie, and before
the first score). On a longer memory the unseen-prompt forecast is made for as much traffic as the shortest one
holds (``horizon_tokens``): the long memory gives the mean loads, not a smaller spread of the next interval's.

With the target method (``decide``'s ``method`` "target", and plans with redundant slots; the local step plans at
its own ``STEP_KAPPA``), the same scores set how much balance a decision insures (the robustness ``kappa``): the
record also keeps the deployed plan's imbalance_max on each interval, and the *balance slack* of an interval is
how much better balanced the deployed plan was than the longest memory's probe (EPLB's plan fitted on all traffic
so far at the decision before: what periodic EPLB recompute would have served). While the mean slack of the last
``SLACK_DECISIONS`` intervals is above ``SLACK_THRESHOLD`` the plan holds more balance than it needs, and decisions
plan at ``LOW_KAPPA``, spending the surplus on colocation; otherwise at ``policy.KAPPA``. A fixed lower kappa met
the issue-13 bar on more prompt orders of DeepSeek-V2-Lite but lost balance on the file order; set from the slack
(in process) it met it on 8 of the same 17 orders against 7 with kappa 4, 11 of 22 with five new ones, and through
the service on 12 of 27 (docs/benchmarks.md).

Dimension key: M memories, N scored decisions, L layers, E experts, P slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from placement.graph import RoutingGraph
from placement.metrics import imbalance_of_loads
from placement.plan import Plan
from placement.replan.policy import KAPPA, decide, steps
from placement.replan.solve import ReplanResult, eplb_plan
from placement.replan.step import STEP_KAPPA

# the long memory's half-life in tokens (0: no decay, all traffic so far); the scored decisions the choice averages
LONG_HALF_LIFE = 0.0
MEMORY_DECISIONS = 4
# the balance slack (module docstring): intervals averaged, the mean above which decisions plan at LOW_KAPPA
SLACK_DECISIONS = 3
SLACK_THRESHOLD = 0.02
LOW_KAPPA = 3.0


@dataclass(frozen=True)
class MemoryChoice:
    """The memories' record (module docstring). ``scores_MN`` float64 [M, N]: per memory, per scored decision, the
    imbalance_max of its probe on the traffic after that decision; ``deployed_N`` float64 [N]: the deployed plan's
    on the same traffic; ``pending_MLP`` int64 [M, L, P]: the probes of the last decision (placements of EPLB's plan
    fitted on each memory), scored at the next one."""

    scores_MN: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    pending_MLP: np.ndarray | None = None
    deployed_N: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def pick(self) -> int:
        """The memory to plan on: the lowest mean of the last ``MEMORY_DECISIONS`` scores (0 on a tie or none)."""
        recent_MN = self.scores_MN[:, -MEMORY_DECISIONS:]
        return int(np.argmin(recent_MN.mean(axis=1))) if recent_MN.size else 0

    def recent(self) -> list[float] | None:
        """Per memory, the mean of its recent scores (None before the first scored decision)."""
        recent_MN = self.scores_MN[:, -MEMORY_DECISIONS:]
        return [round(float(s), 4) for s in recent_MN.mean(axis=1)] if recent_MN.size else None

    def slack(self) -> float | None:
        """The mean balance slack of the last ``SLACK_DECISIONS`` intervals: the longest memory's probe's
        imbalance_max minus the deployed plan's (positive: the deployed plan was better balanced; None before the
        first scored decision, or in a record written before the deployed plan was scored)."""
        n = min(SLACK_DECISIONS, self.deployed_N.size)
        if n == 0 or self.scores_MN.shape[1] < n:
            return None
        return float((self.scores_MN[-1, -n:] - self.deployed_N[-n:]).mean())

    def kappa(self) -> float:
        """The robustness ``decide`` plans at: ``LOW_KAPPA`` while ``slack`` is above ``SLACK_THRESHOLD``, else
        ``policy.KAPPA``."""
        slack = self.slack()
        return LOW_KAPPA if slack is not None and slack > SLACK_THRESHOLD else KAPPA

    def planned_kappa(self, current: Plan, method: str = "step") -> float:
        """The kappa the next decision from ``current`` plans at: ``kappa`` where it re-plans with the target
        (``method`` "target", or redundant slots), the local step's own ``STEP_KAPPA`` otherwise."""
        return STEP_KAPPA if steps(current, method) else self.kappa()

    def scored(self, deployed: Plan, fresh_load_LE: np.ndarray) -> MemoryChoice:
        """With every pending probe scored on ``fresh_load_LE`` (float [L, E]: the traffic since the last decision;
        ``deployed``: the plan that served it, for its GPUs and slots), nothing pending."""
        fresh_LE = np.asarray(fresh_load_LE, dtype=np.float64)
        pending = self.pending_MLP
        if pending is None or not (fresh_LE.sum(axis=1) > 0).all():
            return MemoryChoice(self.scores_MN, None, self.deployed_N)
        new_M = np.array([imbalance_of_loads(replace(deployed, phy2log=p_LP), fresh_LE)[1] for p_LP in pending])
        old_MN, old_N = self.scores_MN, self.deployed_N  # trimmed together, so of one length
        if old_MN.shape[0] != new_M.size or old_N.size != old_MN.shape[1]:  # other memories, or an older record
            old_MN, old_N = np.zeros((new_M.size, 0)), np.zeros(0)
        mine = imbalance_of_loads(deployed, fresh_LE)[1]
        scores_MN = np.column_stack([old_MN, new_M])[:, -MEMORY_DECISIONS:]
        return MemoryChoice(scores_MN, None, np.append(old_N, mine)[-MEMORY_DECISIONS:])

    def after(self, probes: Sequence[Plan]) -> MemoryChoice:
        """With ``probes`` (one plan per memory, EPLB's on each) pending."""
        return MemoryChoice(self.scores_MN, np.stack([p.phy2log for p in probes]).astype(np.int64), self.deployed_N)

    def arrays(self) -> dict[str, np.ndarray]:
        """For a checkpoint (``from_arrays`` reads it back)."""
        pending = np.zeros((0, 0, 0), np.int64) if self.pending_MLP is None else self.pending_MLP
        return {"memory_scores_MN": self.scores_MN, "memory_pending_MLP": pending, "memory_deployed_N": self.deployed_N}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> MemoryChoice:
        """``arrays``' record; an empty one when they hold none (a checkpoint written before it existed)."""
        if "memory_scores_MN" not in arrays:
            return cls()
        scores_MN, pending_MLP = arrays["memory_scores_MN"], arrays["memory_pending_MLP"]
        deployed_N = np.asarray(arrays.get("memory_deployed_N", np.zeros(0)), dtype=np.float64)
        return cls(scores_MN.astype(np.float64), pending_MLP.astype(np.int64) if pending_MLP.size else None, deployed_N)


def decide_on_memories(
    current: Plan, graphs: Sequence[RoutingGraph], choice: MemoryChoice, fresh_load_LE: np.ndarray, **kw: Any
) -> tuple[ReplanResult, MemoryChoice]:
    """``decide`` (``kw``: its options) on the memory ``choice`` picks, at the kappa it sets (unless ``kw`` gives
    one), once the last decision's probes are scored on ``fresh_load_LE`` (float [L, E], the traffic since);
    ``graphs``: the memories, shortest first (one: no choice of memory). Returns the decision, its reason naming the
    memory and the kappa, and the record with this decision's probes pending."""
    choice = choice.scored(current, fresh_load_LE)
    m = choice.pick() if len(graphs) > 1 else 0
    if m > 0 and kw.get("horizon_tokens") is None:  # the forecast's noise: unseen traffic of the window's size
        kw = {**kw, "horizon_tokens": max(graphs[0].num_tokens, 1)}
    slack = choice.slack()
    kw = {"kappa": choice.planned_kappa(current, kw.get("method", "step")), **kw}
    res = decide(current, graphs[m], **kw)
    probes = [replace(current, phy2log=res.info["eplb_phy2log"]) if i == m else eplb_plan(current, g)
              for i, g in enumerate(graphs)]  # fmt: skip
    why_kappa = "no slack measured yet" if slack is None else f"balance slack {slack:+.4f}"
    info = {**res.info, "balance_slack": slack}
    res = replace(res, reason=f"{res.reason} [kappa {res.info['kappa']:g}: {why_kappa}]", info=info)
    if len(graphs) > 1:
        scores = choice.recent()
        why = f"recent probe scores {scores}" if scores else "no probe scored yet"
        res = replace(res, reason=f"{res.reason} [memory {m} of {len(graphs)}: {why}]", info={**res.info, "memory": m})
    return res, choice.after(probes)
