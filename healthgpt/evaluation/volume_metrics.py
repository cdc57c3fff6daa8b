"""SynthRAD2023's image metrics on whole 3D volumes (one patient at a time).

The challenge scores a synthetic CT against the real CT of one patient, inside the body mask, on
the patient's own grid:

* **MAE**: ``sum(|gt - pred| * mask) / sum(mask)`` on the unclipped values (HU);
* **PSNR**: both volumes clipped to [-1024, 3000] HU, only the mask voxels, data range 4024:
  ``10 log10(4024^2 / mean((gt - pred)^2 over the mask))``;
* **SSIM**: both volumes clipped to [-1024, 3000], the outside of the mask set to -1024, both
  shifted by +1024; the 3D SSIM map (7x7x7 uniform window, K1 0.01, K2 0.03, sample covariance,
  data range 4024 — scikit-image's ``structural_similarity`` defaults), cropped by 3 voxels at every
  border, averaged over the (cropped) mask.

For CT→MR (our extension, not a challenge task) the same three numbers are computed in the MR
target's scanner units with its own window in place of [-1024, 3000]: the 0.5-99.5 percentile
window of the voxels inside the body that the builder recorded in ``provenance.target_window``.

The SSIM map is :func:`vlhealth.image_metrics.ssim_map` (box sums over cumulative sums, any
number of dimensions); tests compare every number with an implementation written from the
definitions above on top of scikit-image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlhealth.image_metrics import HU_RANGE, SSIM_WIN, synthrad_mae, synthrad_psnr, synthrad_ssim

__all__ = ["HU_RANGE", "VolumeMetricError", "volume_metrics"]


class VolumeMetricError(ValueError):
    """Volumes that cannot be scored (shapes differ, empty mask, too small for the SSIM window)."""


def volume_metrics(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray,
                   window: Sequence[float] = HU_RANGE) -> dict[str, float]:
    """``{"mae", "psnr", "ssim"}`` of one patient's volumes (the challenge's definitions, module docstring).

    ``window`` is the clipping range and data range: [-1024, 3000] HU for CT (the challenge), the MR
    target's recorded window for MR (our extension).
    """
    g = np.asarray(gt, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    m = np.asarray(mask) > 0
    if g.ndim != 3:
        raise VolumeMetricError(f"expected 3D volumes, got shape {g.shape}")
    if p.shape != g.shape or m.shape != g.shape:
        raise VolumeMetricError(f"shapes differ: target {g.shape}, prediction {p.shape}, mask {m.shape}")
    if not m.any():
        raise VolumeMetricError("the body mask is empty (no voxel > 0)")
    if min(g.shape) < SSIM_WIN:
        raise VolumeMetricError(f"volume {g.shape} is thinner than the {SSIM_WIN}-voxel SSIM window")
    pad = SSIM_WIN // 2
    if not m[tuple(slice(pad, s - pad) for s in m.shape)].any():
        raise VolumeMetricError(f"the body mask has no voxel {pad} or more voxels away from the border")
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise VolumeMetricError(f"window needs hi > lo, got [{lo}, {hi}]")
    return {
        "mae": synthrad_mae(g, p, m),
        "psnr": synthrad_psnr(g, p, m, window=(lo, hi)),
        "ssim": synthrad_ssim(g, p, m, window=(lo, hi)),
    }
