"""Source manifests: one YAML per upstream source in the top-level ``manifests/`` package.

A manifest is data, not code: licence, access level, the on-disk layout a builder expects, the
tasks it yields, instruction templates, split rules and expected counts. Builders read their
templates from here so that wording changes never touch code.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from typing import Any

import yaml

ACCESS_LEVELS = ("open", "registered", "credentialed")
REQUIRED_KEYS = ("name", "title", "homepage", "license", "access", "layout", "tasks")


class ManifestError(ValueError):
    pass


def manifest_text(name: str) -> str:
    try:
        return resources.files("vlhealth.manifest_files").joinpath(f"{name}.yaml").read_text("utf-8")
    except FileNotFoundError as exc:
        available = sorted(p.name[:-5] for p in resources.files("vlhealth.manifest_files").iterdir() if p.name.endswith(".yaml"))
        raise ManifestError(f"no manifest {name!r} (available: {', '.join(available)})") from exc


@cache
def load_manifest(name: str) -> dict[str, Any]:
    """Parsed and checked manifest ``manifests/<name>.yaml``; adds ``sha256`` of its text."""
    text = manifest_text(name)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ManifestError(f"manifests/{name}.yaml: top level must be a mapping")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ManifestError(f"manifests/{name}.yaml: missing keys {missing}")
    if data["access"] not in ACCESS_LEVELS:
        raise ManifestError(f"manifests/{name}.yaml: access must be one of {ACCESS_LEVELS}")
    templates = data.get("templates", {})
    for subtask, items in templates.items():
        if not isinstance(items, list) or not items or not all(isinstance(t, str) and t.strip() for t in items):
            raise ManifestError(f"manifests/{name}.yaml: templates.{subtask} must be a non-empty list of strings")
    data["sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return data


def pick_template(manifest: dict[str, Any], subtask: str, key: str) -> str:
    """A template for ``subtask`` chosen by a stable hash of the sample key (deterministic)."""
    try:
        options = manifest["templates"][subtask]
    except KeyError as exc:
        raise ManifestError(f"manifests/{manifest['name']}.yaml has no templates for {subtask!r}") from exc
    digest = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16)
    return options[digest % len(options)]
