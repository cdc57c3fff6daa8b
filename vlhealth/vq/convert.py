"""VQGAN weights files: reading (taming Lightning ``.ckpt``, ``.pt``, ``.safetensors``), fitting them
onto the network with named errors, converting to safetensors and saving.

The checkpoint's ``loss.*`` (perceptual loss, discriminator) entries are ignored and reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vlhealth.vq.network import GUMBEL_F8_CONFIG, VQGAN, VQConfig

log = logging.getLogger("vlhealth.vq")


# Checkpoint entries that belong to training only (perceptual loss, discriminator).
_IGNORED_PREFIXES = ("loss.",)


_CONFIG_METADATA_KEY = "vq_config"


class VQCheckpointError(ValueError):
    """A weights file that does not fit the VQGAN layout (missing keys, wrong shapes, bad format)."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar_config(path: Path) -> VQConfig | None:
    """A config stored next to a checkpoint: ``<stem>.json``, ``config.json`` or taming's ``model.yaml``."""
    for candidate in (path.with_suffix(".json"), path.parent / "config.json"):
        if candidate.is_file():
            return VQConfig.from_dict(json.loads(candidate.read_text("utf-8")))
    yaml_path = path.parent / "model.yaml"
    if yaml_path.is_file():
        import yaml

        return VQConfig.from_dict(yaml.safe_load(yaml_path.read_text("utf-8")))
    return None


def load_state_dict_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], VQConfig | None]:
    """Read weights from a Lightning ``.ckpt`` (its ``state_dict``), a bare state dict, or safetensors.

    Returns the tensors and the config stored with them (safetensors metadata or a sidecar file),
    if any. Pickles are opened with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)}: VQGAN weights not found; give a taming last.ckpt or a "
                                ".safetensors file (or 'tiny')")
    config: VQConfig | None = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises several error types for corrupt files
            raise VQCheckpointError(f"{path.name}: not a readable safetensors file ({exc})") from exc
        if _CONFIG_METADATA_KEY in meta:
            config = VQConfig.from_dict(json.loads(meta[_CONFIG_METADATA_KEY]))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise VQCheckpointError(f"{path.name}: cannot be read as a weights-only torch checkpoint ({exc})") from exc
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise VQCheckpointError(f"{path.name}: expected a Lightning checkpoint or a state dict of tensors")
        tensors = dict(obj)
    if config is None:
        config = _sidecar_config(path)
    return tensors, config


def _listing(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _fit_state_dict(model: VQGAN, tensors: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Load ``tensors`` into ``model`` strictly; return the ignored (training-only) keys."""
    expected = model.state_dict()
    ignored = sorted(k for k in tensors if k.startswith(_IGNORED_PREFIXES))
    unknown = sorted(k for k in tensors if k not in expected and not k.startswith(_IGNORED_PREFIXES))
    missing = sorted(k for k in expected if k not in tensors)
    wrong = [
        f"{k} (file {tuple(tensors[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches: {_listing(wrong)}")
        raise VQCheckpointError(f"{source}: does not fit the VQGAN config: " + "; ".join(parts))
    if unknown:
        log.warning("%s: %d unexpected keys ignored: %s", source, len(unknown), ", ".join(unknown[:8]))
    if ignored:
        log.info("%s: %d training-only keys (loss/discriminator) ignored", source, len(ignored))
    model.load_state_dict({k: tensors[k].float() for k in expected}, strict=True)
    return ignored + unknown


def convert_checkpoint(
    ckpt_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    config: VQConfig | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the VQGAN weights of ``ckpt_path`` (Lightning .ckpt or safetensors) as safetensors.

    Training-only keys are dropped; the config goes into the safetensors metadata (``vq_config``)
    and into a JSON file beside the output. Returns a summary dict.
    """
    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    tensors, stored = load_state_dict_file(ckpt_path)
    cfg = _as_config(config) or stored or GUMBEL_F8_CONFIG
    model = VQGAN(cfg)
    dropped = _fit_state_dict(model, tensors, ckpt_path.name)
    weights = save_vq(model, out_path)
    return {
        "source": ckpt_path.name,
        "out": out_path.name,
        "tensors": len(weights),
        "parameters": int(sum(v.numel() for v in weights.values())),
        "dropped_keys": len(dropped),
        "config": cfg.to_dict(),
        "sha256": _sha256_file(out_path),
    }


def save_vq(model: VQGAN, out_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Write ``model``'s weights as safetensors with its config in the metadata (``vq_config``) and in a
    JSON sidecar (``<stem>.json``): what :func:`load_vq`, ``vlhealth build --vqgan``, ``healthgpt eval
    --vq`` and ``healthgpt infer --vq`` read. Written to a temporary name and renamed (no torn file)."""
    from safetensors.torch import save_file

    out_path = Path(out_path)
    cfg = model.config
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    save_file(weights, str(tmp), metadata={_CONFIG_METADATA_KEY: cfg_json, "format": "taming-gumbelvq"})
    os.replace(tmp, out_path)
    out_path.with_suffix(".json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n", "utf-8")
    return weights


def _as_config(config: VQConfig | Mapping[str, Any] | None) -> VQConfig | None:
    if config is None or isinstance(config, VQConfig):
        return config
    return VQConfig.from_dict(config)
