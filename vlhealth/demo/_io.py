"""Deterministic writers shared by the demo layouts (same input -> same bytes)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def write_json(path: Path, obj: Any, indent: int | None = 4) -> Path:
    """UTF-8 JSON (non-ASCII kept as is, like the upstream files), fixed key order as given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")
    return path


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    """Baseline JPEG of a greyscale (H, W) or RGB (H, W, 3) uint8 array, no metadata."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"jpeg_bytes needs uint8, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def write_jpeg(path: Path, image: np.ndarray, quality: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(image, quality))
    return path


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buf, format="PNG", optimize=False)
    path.write_bytes(buf.getvalue())
    return path
