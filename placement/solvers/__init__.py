"""Stage "solve": expert -> GPU assignment. Baselines (``baselines``: contiguous, round-robin, EPLB), the exact
ILP (``ilp`` over ``ilp_backends``: CP-SAT, CBC, HiGHS), the scalable affinity optimiser (``affinity``, with
``layer_assign``, ``anneal``, ``replicate``, ``robust``) and the greedy seed (``greedy``); ``base`` holds the
shared ``PlanSpec`` and ``SolveResult``. One entry point over them all: ``placement.planner.make_plan``."""
