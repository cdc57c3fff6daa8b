"""Publishing shard folders to the Hugging Face Hub as a WebDataset dataset repository.

Credentialed sources (MIMIC-CXR, MIMIC-CXR-VQA: PhysioNet credentialed access) are never
published: their ``build.json`` records the manifest's access level and :func:`plan_publish`
refuses them. The dataset card lists every source with its licence and the statistics.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlhealth.manifests import ManifestError, load_manifest
from vlhealth.shards import BUILD_NAME, INDEX_NAME, REJECTS_NAME, list_shards, verify_shards
from vlhealth.stats import compute_stats

PUBLISHABLE_ACCESS = ("open", "registered")


class PublishError(ValueError):
    pass


@dataclass
class PublishPlan:
    folders: list[Path]
    files: list[tuple[Path, str]]  # (local file, path in the repository)
    card: str


def _build_info(folder: Path) -> dict[str, Any]:
    path = folder / BUILD_NAME
    if not path.is_file():
        raise PublishError(f"{folder.name}: no build.json; only folders written by `vlhealth build` can be published")
    return json.loads(path.read_text("utf-8"))


def check_publishable(folder: Path, info: dict[str, Any]) -> None:
    """Refuse credentialed sources, manifests marked ``publishable: false``, and builds whose options
    match the manifest's ``unpublishable_options`` (e.g. OmniMedVQA with its Restricted-access part)."""
    source = info.get("source")
    access = info.get("manifest", {}).get("access")
    if access not in PUBLISHABLE_ACCESS:
        raise PublishError(f"{folder.name}: source {source!r} has access {access!r}; credentialed data "
                           "(e.g. MIMIC) must never be published")
    try:
        manifest = load_manifest(info.get("manifest", {}).get("name", ""))
    except ManifestError:
        manifest = {}
    if manifest.get("publishable") is False:
        raise PublishError(f"{folder.name}: manifests/{manifest['name']}.yaml marks {source!r} as not publishable")
    options = info.get("options", {})
    for option, value in (manifest.get("unpublishable_options") or {}).items():
        if options.get(option) == value:
            raise PublishError(f"{folder.name}: built with --{option.replace('_', '-')} {value}, which "
                               f"manifests/{manifest['name']}.yaml marks as not publishable")


def plan_publish(folders: list[os.PathLike | str]) -> PublishPlan:
    """Check the folders (access level, integrity) and lay out the repository files and card."""
    paths = [Path(f) for f in folders]
    names = [p.name for p in paths]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise PublishError(f"several folders are named {', '.join(clashes)}: each lands in data/<folder name>/ "
                           "on the Hub, so give them distinct names")
    infos = []
    for folder in paths:
        info = _build_info(folder)
        check_publishable(folder, info)
        problems = verify_shards(folder)
        if problems:
            raise PublishError(f"{folder.name}: shards do not match index.json: {problems[:3]}")
        infos.append(info)
    files: list[tuple[Path, str]] = []
    for folder in paths:
        for tar in list_shards(folder):
            files.append((tar, f"data/{folder.name}/{tar.name}"))
        for meta in (INDEX_NAME, BUILD_NAME, REJECTS_NAME, "splits.json"):
            if (folder / meta).is_file():
                files.append((folder / meta, f"data/{folder.name}/{meta}"))
    return PublishPlan(paths, files, dataset_card(paths, infos))


def dataset_card(folders: list[Path], infos: list[dict[str, Any]]) -> str:
    stats = compute_stats(folders)
    configs = "\n".join(
        f"- config_name: {f.name}\n  data_files:\n  - split: train\n    path: data/{f.name}/*.tar" for f in folders
    )
    rows = "\n".join(
        f"| {i.get('source')} | {i['manifest'].get('license')} | {i['counts']['samples']:,} | "
        f"{(i.get('vq') or {}).get('name', '-')} |" for i in infos
    )
    tiny = [i.get("source") for i in infos if (i.get("vq") or {}).get("random_weights")]
    warning = (f"\n> **Note:** {', '.join(map(str, tiny))} were encoded with a random `tiny` VQGAN: their "
               "`target.vq.npy` indices are not meaningful image tokens.\n" if tiny else "")
    by_split = "\n".join(f"| {k} | {v:,} |" for k, v in stats["by_task_subtask_split"].items())
    return f"""---
license: other
task_categories:
- visual-question-answering
- image-to-image
tags:
- medical
- webdataset
configs:
{configs}
---

# VL-Health (built with vlhealth)

WebDataset shards; one sample = `json` (task, subtask, split, LLaVA conversations, provenance),
`input.png|jpg`, and for generation `target.png` + `target.vq.npy` (1024 VQGAN indices). The
`split` field inside `json` is the real split (each config is exposed as one `train` split by the
Hub; filter on `json.split`).
{warning}
| source | licence | samples | VQGAN |
| --- | --- | ---: | --- |
{rows}

| task/subtask/split | samples |
| --- | ---: |
{by_split}

Each source keeps its own licence; read them before use.
"""


def publish(folders: list[os.PathLike | str], repo_id: str, *, token: str | None = None, private: bool = True,
            dry_run: bool = False) -> PublishPlan:
    plan = plan_publish(folders)
    if dry_run:
        return plan
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=dst, path_or_fileobj=str(src)) for src, dst in plan.files]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode("utf-8")))
    api.create_commit(repo_id, operations=ops, repo_type="dataset",
                      commit_message=f"Add {len(plan.folders)} VL-Health shard folder(s)")
    return plan
