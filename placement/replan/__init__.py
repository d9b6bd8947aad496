"""Migration-aware re-planning: from the deployed plan, trade forecast balance and colocation against moves.

``moves`` counts and schedules migrations between plans (../shared/METRICS.md moves); ``solve`` re-plans under
a move budget; ``decide`` is the service's policy (re-plan only when the forecast gain outweighs the cost).
"""

from __future__ import annotations

from placement.replan.moves import MoveList, apply_moves, count_moves, holders_LEG, move_list, relabel_gpus

__all__ = ["MoveList", "apply_moves", "count_moves", "holders_LEG", "move_list", "relabel_gpus"]
