"""Migration-aware re-planning: from the deployed plan, trade forecast balance and colocation against moves.

``moves`` counts and schedules migrations between plans (../shared/METRICS.md moves, rounds for one spare slot
per GPU); ``solve`` re-plans under a move budget (affinity target, layer mix, swap search, exact model where it
fits); ``step`` is a bounded local step from the deployed plan; ``policy.decide`` is the service's policy (the
local step with one replica per expert, else a re-plan when the forecast gain outweighs the cost).
"""

from __future__ import annotations

from placement.replan.memory import MemoryChoice, decide_on_memories
from placement.replan.moves import Move, MoveList, apply_moves, count_moves, holders_LEG, move_list, relabel_gpus
from placement.replan.policy import Calibration, decide, default_budget
from placement.replan.solve import ReplanResult, replan, warm_up
from placement.replan.step import local_step

__all__ = [
    "Calibration",
    "MemoryChoice",
    "Move",
    "MoveList",
    "ReplanResult",
    "apply_moves",
    "count_moves",
    "decide",
    "decide_on_memories",
    "default_budget",
    "holders_LEG",
    "local_step",
    "move_list",
    "relabel_gpus",
    "replan",
    "warm_up",
]
