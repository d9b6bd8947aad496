"""Placement solvers: baselines, exact ILP, scalable affinity optimiser; one interface (``placement.planner``)."""
