"""The stage policy of the three-stage trainer: what each stage and task trains, and at which LR.

Stages (paper §4.4; ARCHITECTURE.md "Contracts") and what each trains (``STAGE_GROUPS``; everything else frozen):

======= ================ ==========================================================================
stage   task             trainable parameter groups (``HealthGPT.parameter_groups()`` names)
======= ================ ==========================================================================
1       comprehension    abstract_adapter
1       generation       concrete_adapter, generation_plugin, new_token_rows
1       mixed            the union of the two above
2       any (mixed)      word_embeddings, lm_head, new_token_rows  (= all embedding / head rows)
3       comprehension    comprehension_plugin, abstract_adapter
3       generation       generation_plugin, concrete_adapter
3       mixed            both plugins and both adapters
======= ================ ==========================================================================

Each stage starts from the previous stage's output (``--init``): a stage's weights file holds every
group trained in it *or* in the stages before, so stage 3 needs only stage 2's file.

Optimizer groups: the visual adapters (``ADAPTER_GROUPS``) train at ``adapter_lr``, everything else
(H-LoRA plugins, embedding and head rows) at ``lr``. In a ``mixed`` run whose two tasks have
different values in Table 7 (``HParams.by_task``), each task's groups take their own task's LR.

Public API::

    STAGE_GROUPS, ADAPTER_GROUPS, TASK_OF_GROUP
    stage_groups(stage, task) -> tuple[str, ...]
    optimizer_groups(model, params, groups, hp) -> list[dict]   (torch.optim param groups, named)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from healthgpt.model.core import GROUP_NAMES

__all__ = ["ADAPTER_GROUPS", "STAGE_GROUPS", "TASK_OF_GROUP", "optimizer_groups", "stage_groups"]

TRAIN_TASKS = ("comprehension", "generation", "mixed")

_COMP = ("abstract_adapter",)
_GEN = ("concrete_adapter", "generation_plugin", "new_token_rows")
STAGE_GROUPS: dict[int, dict[str, tuple[str, ...]]] = {
    1: {"comprehension": _COMP, "generation": _GEN, "mixed": _COMP + _GEN},
    2: {t: ("word_embeddings", "lm_head", "new_token_rows") for t in TRAIN_TASKS},
    3: {
        "comprehension": ("comprehension_plugin", "abstract_adapter"),
        "generation": ("generation_plugin", "concrete_adapter"),
        "mixed": ("comprehension_plugin", "generation_plugin", "abstract_adapter", "concrete_adapter"),
    },
}
ADAPTER_GROUPS = ("abstract_adapter", "concrete_adapter")  # trained at adapter_lr; the rest at lr
# The task whose Table 7 column sets a group's LR in a mixed run (word_embeddings and lm_head are
# shared: stage 2 has one column for both tasks).
TASK_OF_GROUP = {
    "abstract_adapter": "comprehension", "comprehension_plugin": "comprehension",
    "concrete_adapter": "generation", "generation_plugin": "generation", "new_token_rows": "generation",
}


def _check_against_model() -> None:
    """The policy names only groups the model has (checked at import, so a renamed group fails loudly)."""
    named = {g for by_task in STAGE_GROUPS.values() for gs in by_task.values() for g in gs}
    unknown = (named | set(ADAPTER_GROUPS) | set(TASK_OF_GROUP)) - set(GROUP_NAMES)
    if unknown:
        raise ImportError(f"healthgpt.training.stages names parameter groups the model does not have: {sorted(unknown)}")


_check_against_model()


def stage_groups(stage: int, task: str) -> tuple[str, ...]:
    try:
        return STAGE_GROUPS[stage][task]
    except KeyError:
        raise ValueError(f"unknown stage/task {stage}/{task!r}: stage 1, 2 or 3; task comprehension, "
                         "generation or mixed") from None


def optimizer_groups(model: Any, params: Sequence[nn.Parameter], groups: Sequence[str], hp: Any) -> list[dict[str, Any]]:
    """AdamW parameter groups for the trainable ``params`` of stage ``groups``.

    Named ``adapter`` and ``lora`` (the LR columns of Table 7); when ``hp.by_task`` gives a task its
    own values (a mixed run over two Table 7 columns), a group is split per task
    (``adapter:comprehension``, ``lora:generation``, ...)."""
    all_groups = model.parameter_groups()
    trainable = {id(p) for p in params}
    by_task = getattr(hp, "by_task", None) or {}
    buckets: dict[str, tuple[float, list[nn.Parameter]]] = {}
    seen: set[int] = set()
    for group in list(groups) + ["_rest"]:
        members = all_groups.get(group, []) if group != "_rest" else params
        kind = "adapter" if group in ADAPTER_GROUPS else "lora"
        task = TASK_OF_GROUP.get(group)
        source = by_task.get(task, hp) if task in by_task else hp
        lr = source.adapter_lr if kind == "adapter" else source.lr
        name = f"{kind}:{task}" if task in by_task else kind
        for p in members:
            if id(p) in trainable and id(p) not in seen:
                seen.add(id(p))
                buckets.setdefault(name, (lr, []))[1].append(p)
    order = sorted(buckets, key=lambda n: (not n.startswith("adapter"), n))  # adapter first, as before
    # keep each bucket's parameters in the order of ``params`` (the optimizer state's order)
    position = {id(p): i for i, p in enumerate(params)}
    return [{"params": sorted(buckets[n][1], key=lambda p: position[id(p)]), "lr": buckets[n][0], "name": n}
            for n in order]
