"""``healthgpt plan``: size a training run (memory, FLOPs, time, fit) without a GPU.

* ``arch`` — the architecture files (``healthgpt/model/architectures/*.json``) and a weightless model;
* ``memtrack`` — live storage bytes (and FLOPs) of whatever runs inside it, real or fake tensors;
* ``trace`` — one training step of the real ``HealthGPT`` traced on fake tensors;
* ``formulas`` — the closed-form cross-check;
* ``measure`` — a real CPU step's peak (torch profiler), to validate the trace;
* ``core`` — ``make_plan`` (the JSON); ``cli`` — the command.
"""

from healthgpt.training.plan.core import PlanConfig, make_plan

__all__ = ["PlanConfig", "make_plan"]
