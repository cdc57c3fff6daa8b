"""Helpers shared by the comprehension demo layouts (MIMIC-CXR-VQA, LLaVA-Med, PubMedVision,
LLaVA-665k, OmniMedVQA): natural-looking RGB pictures, figure-like panels and the planted leak.

**The planted leak**: :func:`leak_image` is one OmniMedVQA *test* image. The OmniMedVQA layout
writes it as a test image; the PubMedVision layout writes a copy of it, resized to 75% and
recompressed at JPEG quality 70, as a *training* image. ``vlhealth check-leaks`` must find it and
``--drop-leaks`` must remove it. It is drawn from a fixed generator (not the source's), so both
layouts produce the same picture whatever the seed and whichever sources are written.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

from vlhealth.demo import phantom

LEAK_SEED = 20250213
LEAK_SIZE = (224, 224)
LEAK_COPY_SCALE = 0.75
LEAK_COPY_QUALITY = 70


def leak_image() -> np.ndarray:
    """The OmniMedVQA test image that also turns up (recompressed, resized) in PubMedVision."""
    return phantom.scan_2d(np.random.default_rng(LEAK_SEED), "ct_head", 1, LEAK_SIZE).image


def leaked_copy_jpeg() -> bytes:
    """The training-source copy: resized to 75% (bicubic) and recompressed at JPEG quality 70."""
    img = Image.fromarray(leak_image())
    w, h = img.size
    small = img.resize((round(w * LEAK_COPY_SCALE), round(h * LEAK_COPY_SCALE)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=LEAK_COPY_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()


def natural_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A photo-like RGB picture: a smooth colour field with a few bright shapes (COCO/GQA stand-in)."""
    h, w = size
    field = np.stack([ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), 12.0) for _ in range(3)], -1)
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    img = 40 + 170 * field
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.08, 0.25) * h, rng.uniform(0.08, 0.25) * w
        colour = rng.uniform(0, 255, 3)
        if rng.integers(0, 2):
            mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0
        else:
            mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        img[mask] = colour
    img += rng.normal(0, 4, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def figure_panel(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, phantom.Scan2D]:
    """A PMC-figure-like picture: a phantom scan on a white page margin (RGB)."""
    h, w = size
    kind = phantom.SCAN_KINDS[int(rng.integers(0, len(phantom.SCAN_KINDS)))]
    scan = phantom.scan_2d(rng, kind, int(rng.integers(0, 3)), (h - 16, w - 16))
    page = np.full((h, w, 3), 255, np.uint8)
    page[8:-8, 8:-8] = scan.image[..., None]
    return page, scan


MODALITY_WORD = {"CT": "CT", "MRI": "MRI", "X-ray": "X-ray"}
REGION_WORD = {"head": "brain", "pelvis": "pelvis", "chest": "chest"}


def describe(scan: phantom.Scan2D) -> str:
    n = len(scan.lesions)
    lesions = "no focal lesion" if n == 0 else ("a single lesion on the " + scan.lesions[0].side + " side"
                                                 if n == 1 else f"{n} lesions")
    return (f"{MODALITY_WORD[scan.modality]} image of the {REGION_WORD[scan.region]} "
            f"({scan.plane} plane) showing {lesions}.")
