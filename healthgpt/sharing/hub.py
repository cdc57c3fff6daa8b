"""Models by Hub id: ``hf://ORG/NAME[@REVISION]`` wherever a checkpoint or export folder is accepted.

``train --init``, ``infer``/``serve``/``eval``/``eval-volumes --checkpoint`` and ``--released`` take a
Hub id as well as a local path; :func:`resolve_model` turns it into a folder of ``huggingface_hub``'s
cache (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), downloading only what that use needs:

* ``--checkpoint`` / ``--init`` (``kind="checkpoint"``): first ``healthgpt_export.json`` (plus, for a
  repository holding a training run instead, ``trainable.safetensors`` and ``train_summary.json``, at
  the top or under ``final/``); for an export, then exactly the files its manifest lists, each checked
  against the manifest's SHA-256 (:func:`healthgpt.sharing.export.verify_export`) before use;
* ``--released`` (``kind="released"``): the released HealthGPT files only (``com_hlora_weights.bin``,
  ``com_hlora_weights_phi4.bin``, ``gen_hlora_weights.bin``, ``fusion_layer_weights.bin``), e.g.
  ``hf://lintw/HealthGPT-M3``.

Offline (``HF_HUB_OFFLINE=1``) the cache alone is used (the revision through the cache's
``refs/<revision>``, or a commit hash directly); what is missing there is an error that names the
files and the ``hf download`` command that fetches them. A revision pins a tag, branch or commit.

Public API::

    HUB_SCHEME;  HubId;  HubError
    parse_hub_id(spec) -> HubId | None
    resolve_model(spec, kind="checkpoint") -> Path | None      (a local path comes back unchanged)
    display_name(spec) -> str                                   (a folder name or the Hub id, for messages)
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HUB_SCHEME", "RELEASED_FILES", "HubError", "HubId", "display_name", "parse_hub_id", "resolve_model"]

HUB_SCHEME = "hf://"
RELEASED_FILES = ("com_hlora_weights.bin", "com_hlora_weights_phi4.bin", "gen_hlora_weights.bin",
                  "fusion_layer_weights.bin")
RUN_FILES = ("trainable.safetensors", "train_summary.json", "final/trainable.safetensors", "final/train_summary.json")
_ID = re.compile(r"^hf:/{1,2}(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w./-]+))?/?$")


class HubError(ValueError):
    """A Hub id that is malformed, unknown, not cached (offline) or whose files fail their check."""


@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HUB_SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(spec: str | os.PathLike[str] | None) -> HubId | None:
    """``hf://ORG/NAME[@REVISION]`` -> HubId; anything else (a local path) -> None. (``hf:/ORG/NAME``, what
    ``pathlib`` makes of the id, is read the same.)"""
    if spec is None:
        return None
    text = os.fspath(spec)
    if not text.startswith("hf:/"):
        return None
    m = _ID.match(text)
    if m is None:
        raise HubError(f"{text}: not a Hub model id; expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
    return HubId(m.group("repo"), m.group("rev"))


def display_name(spec: str | os.PathLike[str]) -> str:
    """How messages and records name a model source: the Hub id itself, or a local folder's name only."""
    hub = parse_hub_id(spec)
    return str(hub) if hub is not None else Path(spec).name


def resolve_model(spec: str | os.PathLike[str] | None, kind: str = "checkpoint") -> Path | None:
    """A local folder for ``spec``: a local path unchanged, a Hub id downloaded (or found in the cache)."""
    hub = parse_hub_id(spec)
    if hub is None:
        return None if spec is None else Path(spec)
    if kind not in ("checkpoint", "released"):
        raise ValueError(f"kind must be checkpoint or released, not {kind!r}")
    from huggingface_hub import constants

    return _resolve(hub, kind, str(constants.HF_HUB_CACHE), _offline())


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=32)
def _resolve(hub: HubId, kind: str, cache: str, offline: bool) -> Path:
    """Resolved once per process (per id, cache and mode): the SHA-256 check of a large export runs once."""
    if kind == "released":
        folder = _download(hub, RELEASED_FILES, offline)
        if not any((folder / f).is_file() for f in RELEASED_FILES):
            raise HubError(f"{hub}: none of {', '.join(RELEASED_FILES)} in this repository"
                           + _fetch_hint(hub, RELEASED_FILES[::2], offline))
        return folder
    from healthgpt.model.weights import CheckpointError, resolve_trainable
    from healthgpt.sharing.export import EXPORT_INFO, ExportError, read_export_info, verify_export

    folder = _download(hub, (EXPORT_INFO, *RUN_FILES), offline)
    if (folder / EXPORT_INFO).is_file():
        try:
            listed = sorted(read_export_info(folder).get("files") or {})
        except ExportError as err:
            raise HubError(f"{hub}: {err}") from err
        # the same commit as the manifest, whatever the branch has moved to since
        pinned = HubId(hub.repo_id, folder.name) if re.fullmatch(r"[0-9a-f]{40}", folder.name) else hub
        folder = _download(pinned, (EXPORT_INFO, *listed), offline, shown=hub)
        missing = [f for f in listed if not (folder / f).is_file()]
        if missing:
            raise HubError(f"{hub}: {len(missing)} file(s) of the export are not in the local cache ({missing[:3]})"
                           + _fetch_hint(hub, (EXPORT_INFO, *listed), offline))
        try:
            verify_export(folder)
        except ExportError as err:
            raise HubError(f"{hub}: {err}") from err
        return folder
    try:
        resolve_trainable(folder)
    except CheckpointError:
        raise HubError(f"{hub}: neither a `healthgpt export` ({EXPORT_INFO}) nor a training run "
                       "(trainable.safetensors) in this repository" + _fetch_hint(hub, (EXPORT_INFO,), offline)) from None
    return folder


def _fetch_hint(hub: HubId, files: Sequence[str], offline: bool) -> str:
    if not offline:
        return ""
    rev = f" --revision {hub.revision}" if hub.revision else ""
    return (f"; HF_HUB_OFFLINE=1 allows only the local cache: download it once while online with "
            f"`hf download {hub.repo_id} {' '.join(files)}{rev}` (or `huggingface-cli download`, same arguments)")


def _download(hub: HubId, patterns: Sequence[str], offline: bool, shown: HubId | None = None) -> Path:
    """``snapshot_download`` of the files matching ``patterns`` (exact names here): their snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown = shown or hub
    try:
        folder = snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=list(patterns),
                                   local_files_only=offline)
    except RevisionNotFoundError as err:
        raise HubError(f"{shown}: no revision {hub.revision!r} in {hub.repo_id}") from err
    except GatedRepoError as err:
        raise HubError(f"{shown}: a gated repository; accept its terms on the Hub and log in (`hf auth login`)") from err
    except RepositoryNotFoundError as err:
        raise HubError(f"{shown}: no such model repository (or it is private: log in with `hf auth login`)") from err
    except LocalEntryNotFoundError as err:  # offline, or the Hub not reachable, and not in the cache
        reason = ("not in the local Hugging Face cache" if offline else
                  "the Hub could not be reached and it is not in the local Hugging Face cache")
        raise HubError(f"{shown}: {reason}" + (_fetch_hint(shown, patterns, True) if offline else "")) from err
    except HfHubHTTPError as err:
        raise HubError(f"{shown}: the Hub answered {err}") from err
    except OSError as err:  # e.g. an incomplete cached snapshot (huggingface_hub's IncompleteSnapshotError)
        raise HubError(f"{shown}: {err}" + _fetch_hint(shown, patterns, offline)) from err
    return Path(folder)
