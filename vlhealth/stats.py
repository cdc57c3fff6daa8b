"""Statistics of shard folders: counts by task, subtask, source, split, modality, body part, answer type,
plus images, bytes and VQ tokens; rendered as a rich table, JSON, or bar charts (paper Fig. 4 style)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlhealth.schema import VQ_LENGTH
from vlhealth.shards import iter_records, list_shards

FACETS = ("task", "subtask", "source", "split", "modality", "body_part", "answer_type")
IMAGE_MEMBERS = ("input.png", "input.jpg", "target.png")


def compute_stats(sources: Iterable[os.PathLike | str]) -> dict[str, Any]:
    sources = list(sources)
    tars = list_shards(sources)
    facets: dict[str, Counter[str]] = {f: Counter() for f in FACETS}
    by_task_subtask_split: Counter[str] = Counter()
    by_task_subtask_anatomy_split: Counter[str] = Counter()
    samples = images = vq_tokens = total_bytes = 0
    for _key, record, sizes in iter_records(tars):
        samples += 1
        for f in FACETS:
            value = record.get(f)
            facets[f][str(value) if value is not None else "unspecified"] += 1
        by_task_subtask_split[f"{record['task']}/{record['subtask']}/{record['split']}"] += 1
        # generation subtasks are defined per anatomy in the paper (CT2MRI-Brain, MRI2CT-Pelvis, ...)
        anatomy = (record.get("body_part") or "unspecified") if record["task"] == "generation" else "all"
        by_task_subtask_anatomy_split[f"{record['task']}/{record['subtask']}/{anatomy}/{record['split']}"] += 1
        images += sum(1 for m in IMAGE_MEMBERS if m in sizes)
        if "target.vq.npy" in sizes:  # int16 codes after the 128-byte header of a 1-D .npy (v1.0)
            vq_tokens += min(VQ_LENGTH, max(0, (sizes["target.vq.npy"] - 128) // 2))
        total_bytes += sum(sizes.values())
    return {
        "shards": len(tars),
        "tar_bytes": sum(p.stat().st_size for p in tars),
        "samples": samples,
        "images": images,
        "payload_bytes": total_bytes,
        "vq_tokens": vq_tokens,
        "by": {f: dict(sorted(c.items())) for f, c in facets.items()},
        "by_task_subtask_split": dict(sorted(by_task_subtask_split.items())),
        "by_task_subtask_anatomy_split": dict(sorted(by_task_subtask_anatomy_split.items())),
    }


def render_table(stats: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    head = Table(title="VL-Health shards", show_header=False)
    for label, key in (("shards", "shards"), ("samples", "samples"), ("images", "images"),
                       ("VQ tokens", "vq_tokens"), ("bytes (tars)", "tar_bytes")):
        head.add_row(label, f"{stats[key]:,}")
    console.print(head)
    table = Table(title="samples by task / subtask / anatomy (generation) / split")
    table.add_column("task")
    table.add_column("subtask")
    table.add_column("anatomy")
    splits = ("train", "val", "test")
    for s in splits:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    rows: dict[tuple[str, str, str], Counter[str]] = {}
    for name, n in stats["by_task_subtask_anatomy_split"].items():
        task, subtask, anatomy, split = name.split("/")
        rows.setdefault((task, subtask, anatomy), Counter())[split] += n
    for (task, subtask, anatomy), c in sorted(rows.items()):
        table.add_row(task, subtask, anatomy, *(f"{c.get(s, 0):,}" for s in splits), f"{sum(c.values()):,}")
    console.print(table)
    for facet in ("source", "modality", "body_part", "answer_type"):
        t = Table(title=f"samples by {facet}")
        t.add_column(facet)
        t.add_column("samples", justify="right")
        for k, v in sorted(stats["by"][facet].items(), key=lambda kv: -kv[1]):
            t.add_row(k, f"{v:,}")
        console.print(t)


def plot_stats(stats: dict[str, Any], path: os.PathLike | str) -> Path:
    """Bar charts of samples per subtask, source, modality and body part (the paper's Figure 4 spirit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("subtask", "Samples per subtask"), ("source", "Samples per source"),
              ("modality", "Samples per modality"), ("body_part", "Samples per body part")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (facet, title) in zip(axes.ravel(), panels, strict=True):
        items = sorted(stats["by"][facet].items(), key=lambda kv: -kv[1])
        labels = [k for k, _ in items]
        values = [v for _, v in items]
        colors = plt.cm.tab20.colors  # type: ignore[attr-defined]
        ax.barh(labels[::-1], values[::-1], color=[colors[i % len(colors)] for i in range(len(values))][::-1])
        ax.set_title(title)
        ax.set_xlabel("samples")
        for i, v in enumerate(values[::-1]):
            ax.text(v, i, f" {v:,}", va="center", fontsize=8)
    fig.suptitle(f"VL-Health: {stats['samples']:,} samples, {stats['images']:,} images")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path
