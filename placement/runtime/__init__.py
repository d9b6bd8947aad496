"""Stage "apply": plans run in a real torch.distributed expert-parallel runtime.

``dispatch`` (which rank computes which token-expert pair; the all-to-all exchanger), ``replay`` (the EP layer
math replaying a trace's routing, and its single-process reference), ``live`` (the shipped demo model or a
transformers MoE run expert-parallel under a plan), ``launch`` (local process groups, ``ep_bench`` and
``live_bench``) and ``migrate`` (a running runtime moves its expert weights to a new plan by a move list)."""
