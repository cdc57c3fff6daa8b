"""Generation metrics: SSIM / PSNR / MSE on 8-bit images, SynthRAD2023's HU metrics, LPIPS.

Conventions (written into every report):

* **8-bit metrics** (the paper's Tables 4-5) compare the decoded 256x256 prediction with the
  8-bit target. SSIM is the Wang et al. (2004) index with the defaults of scikit-image's
  ``structural_similarity``: a 7x7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03,
  data range 255, averaged over the window positions that lie fully inside the image (and over
  channels for RGB). PSNR is ``10 log10(255^2 / MSE)`` and MSE the mean squared difference in
  8-bit grey levels, both per image; identical images have PSNR = inf (kept as such; reports
  say how many). SSIM is reported x100 in the tables, as the paper does.
* **SynthRAD2023 metrics** (CT targets only, on Hounsfield units, the challenge's definitions):
  MAE = sum(|gt - pred| * mask) / sum(mask); PSNR after clipping both to [-1024, 3000] HU, data
  range 4024, over mask voxels; SSIM after clipping, setting voxels outside the mask to -1024 and
  shifting by +1024, data range 4024, averaged over the window centres inside the mask (border
  of 3 excluded).
* **LPIPS** (AlexNet, v0.1 linear heads) only when local weights are given; otherwise a report
  says "not computed".

SSIM is implemented here with box sums over cumulative sums (any number of dimensions, float64);
tests check it against scikit-image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlhealth.volumes import Window, grey_levels

__all__ = [
    "HU_RANGE",
    "LPIPS",
    "LPIPSWeightsError",
    "SSIM_WIN",
    "image_metrics",
    "load_lpips",
    "mse",
    "psnr",
    "ssim",
    "ssim_map",
    "synthrad_mae",
    "synthrad_metrics",
    "synthrad_psnr",
    "synthrad_ssim",
    "to_hu",
]

SSIM_WIN = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
HU_RANGE = (-1024.0, 3000.0)


def _pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(pred, dtype=np.float64)
    b = np.asarray(target, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"prediction shape {a.shape} differs from target shape {b.shape}")
    return a, b


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean squared difference (in the images' own units, e.g. 8-bit grey levels)."""
    a, b = _pair(pred, target)
    return float(np.mean((a - b) ** 2))


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 255.0) -> float:
    """``10 log10(data_range^2 / MSE)`` in dB; ``inf`` for identical images."""
    err = mse(pred, target)
    if err == 0.0:
        return math.inf
    return float(10.0 * np.log10(data_range**2 / err))


def _box_mean_valid(x: np.ndarray, win: int) -> np.ndarray:
    """Mean over every win^n window lying fully inside ``x`` (shape shrinks by win-1 per axis)."""
    out = x
    for axis in range(x.ndim):
        c = np.cumsum(out, axis=axis, dtype=np.float64)
        zero_shape = list(c.shape)
        zero_shape[axis] = 1
        c = np.concatenate([np.zeros(zero_shape), c], axis=axis)
        hi = np.take(c, np.arange(win, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - win), axis=axis)
        out = (hi - lo) / win
    return out


def ssim_map(pred: np.ndarray, target: np.ndarray, data_range: float, win: int = SSIM_WIN) -> np.ndarray:
    """Local SSIM at every window centre that is ``win // 2`` or more from each border.

    Single-channel arrays of any dimension (2D slice, 3D volume). The result has shape
    ``shape - (win - 1)`` and equals scikit-image's full SSIM map cropped by ``win // 2``.
    """
    a, b = _pair(pred, target)
    if win % 2 != 1 or win < 3:
        raise ValueError(f"SSIM window must be odd and >= 3, got {win}")
    if min(a.shape) < win:
        raise ValueError(f"image {a.shape} is smaller than the {win}-pixel SSIM window")
    n = win**a.ndim
    cov_norm = n / (n - 1.0)  # sample covariance, as scikit-image's default
    ux, uy = _box_mean_valid(a, win), _box_mean_valid(b, win)
    uxx, uyy, uxy = _box_mean_valid(a * a, win), _box_mean_valid(b * b, win), _box_mean_valid(a * b, win)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float = 255.0, channel_axis: int | None = None) -> float:
    """Mean SSIM (``[-1, 1]``). ``channel_axis`` averages per-channel SSIM (RGB images)."""
    a, b = _pair(pred, target)
    if channel_axis is None:
        return float(ssim_map(a, b, data_range).mean())
    a = np.moveaxis(a, channel_axis, -1)
    b = np.moveaxis(b, channel_axis, -1)
    return float(np.mean([ssim_map(a[..., c], b[..., c], data_range).mean() for c in range(a.shape[-1])]))


def _as_grey_or_rgb(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a 2D grey or HxWx3 image, got shape {arr.shape}")
    return arr


def image_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """SSIM (0-1), PSNR (dB) and MSE (grey levels^2) of two 8-bit images.

    A grey target and an RGB prediction (or the reverse) are compared in grey: an RGB image whose
    channels are equal is taken as grey, otherwise its luma (ITU-R 601) is used.
    """
    p, t = _as_grey_or_rgb(pred), _as_grey_or_rgb(target)
    if p.ndim != t.ndim:
        p, t = grey_levels(p), grey_levels(t)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and target {t.shape} differ in size")
    channel_axis = -1 if p.ndim == 3 else None
    return {
        "ssim": ssim(p, t, 255.0, channel_axis=channel_axis),
        "psnr": psnr(p, t, 255.0),
        "mse": mse(p, t),
    }


# -- SynthRAD2023 (Hounsfield units) ----------------------------------------------------------
def to_hu(img8: np.ndarray, window: Sequence[float] = HU_RANGE) -> np.ndarray:
    """Map 8-bit grey levels back to HU through the linear window ``(lo, hi)`` they were made with."""
    grey = grey_levels(_as_grey_or_rgb(img8)) if np.asarray(img8).ndim == 3 else np.asarray(img8, dtype=np.float64)
    return Window(float(window[0]), float(window[1]), "ct_hu").decode(grey, top=255.0)


def _binary(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask) > 0
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} differs from image shape {shape}")
    if not m.any():
        raise ValueError("the body mask is empty")
    return m


def synthrad_mae(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Masked mean absolute error in HU (no clipping, as the challenge)."""
    p, g = _pair(pred, gt)
    m = _binary(mask, g.shape)
    return float(np.abs(g - p)[m].sum() / m.sum())


def synthrad_psnr(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None,
                  window: Sequence[float] = HU_RANGE) -> float:
    """Masked PSNR with both images clipped to ``window`` ([-1024, 3000] HU) and data range hi - lo (4024)."""
    p, g = _pair(pred, gt)
    lo, hi = float(window[0]), float(window[1])
    m = _binary(mask, g.shape)
    err = float(np.mean((np.clip(g, lo, hi)[m] - np.clip(p, lo, hi)[m]) ** 2))
    if err == 0.0:
        return math.inf
    return float(10.0 * np.log10((hi - lo) ** 2 / err))


def synthrad_ssim(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None,
                  window: Sequence[float] = HU_RANGE) -> float:
    """SSIM on values clipped to ``window`` (HU: [-1024, 3000]) with the outside of the mask set to the
    window's low end and shifted to start at 0, data range hi - lo, averaged inside the mask (any ndim)."""
    p, g = _pair(pred, gt)
    lo, hi = float(window[0]), float(window[1])
    m = _binary(mask, g.shape)
    g = np.where(m, np.clip(g, lo, hi), lo) - lo
    p = np.where(m, np.clip(p, lo, hi), lo) - lo
    smap = ssim_map(p, g, data_range=hi - lo)
    if mask is None:
        return float(smap.mean())
    pad = SSIM_WIN // 2
    inner = m[tuple(slice(pad, s - pad) for s in m.shape)]
    if not inner.any():
        raise ValueError("the body mask has no voxel away from the border")
    return float(smap[inner].mean(dtype=np.float64))


def synthrad_metrics(gt_hu: np.ndarray, pred_hu: np.ndarray, mask: np.ndarray | None) -> dict[str, float]:
    return {
        "mae_hu": synthrad_mae(gt_hu, pred_hu, mask),
        "psnr_hu": synthrad_psnr(gt_hu, pred_hu, mask),
        "ssim_hu": synthrad_ssim(gt_hu, pred_hu, mask),
    }


# -- LPIPS (AlexNet) --------------------------------------------------------------------------
class LPIPSWeightsError(ValueError):
    """LPIPS weights that are missing, unreadable or of the wrong layout."""


# AlexNet's feature stack: (index in torchvision's ``features``, in, out, kernel, stride, padding).
_ALEX_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1),
               (8, 384, 256, 3, 1, 1), (10, 256, 256, 3, 1, 1))
_ALEX_CHANNELS = (64, 192, 384, 256, 256)
# LPIPS's input scaling (images in [-1, 1] shifted and scaled to ImageNet statistics).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# Where the lpips package keeps each AlexNet conv (``net.sliceK.<features index>``).
_LPIPS_SLICE = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


class LPIPS(nn.Module):
    """LPIPS distance with an AlexNet backbone, written in plain torch (no torchvision).

    Five ReLU outputs of AlexNet are unit-normalised along channels, their squared differences
    weighted by non-negative 1x1 heads, averaged over space and summed over layers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, stride=s, padding=p) for _, i, o, k, s, p in _ALEX_CONVS)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _ALEX_CHANNELS)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        feats = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # max-pool before the 2nd and 3rd conv
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = F.relu(conv(x))
            feats.append(x)
        return feats

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance per pair of images given as float [N, 3, H, W] in [-1, 1]."""
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for fa, fb, head in zip(self.features(a), self.features(b), self.heads, strict=True):
            na = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + head((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total

    @torch.no_grad()
    def distance_uint8(self, pred: np.ndarray, target: np.ndarray) -> float:
        """LPIPS of two 8-bit images (grey images are repeated to three channels)."""
        dev = self.shift.device

        def prep(img: np.ndarray) -> torch.Tensor:
            arr = _as_grey_or_rgb(img)
            t = torch.from_numpy(np.ascontiguousarray(arr)).to(dev, torch.float32)
            t = t.unsqueeze(0).repeat(3, 1, 1) if t.ndim == 2 else t.permute(2, 0, 1)
            return (t / 127.5 - 1.0).unsqueeze(0)

        return float(self(prep(pred), prep(target))[0])


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LPIPSWeightsError(f"{path.name}: no such LPIPS weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable or a pickle with non-tensor objects
        raise LPIPSWeightsError(f"{path.name}: cannot read weights ({exc.__class__.__name__}: {exc})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LPIPSWeightsError(f"{path.name}: expected a state dict, got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _map_key(key: str) -> str | None:
    """Our parameter name for a key of torchvision's AlexNet, the lpips package, or ours."""
    k = key.removeprefix("module.")
    parts = k.split(".")
    if k.startswith(("convs.", "heads.")):
        return k
    if parts[0] == "features" and len(parts) == 3 and parts[1].isdigit():
        idx = int(parts[1])
        pos = [c[0] for c in _ALEX_CONVS]
        return f"convs.{pos.index(idx)}.{parts[2]}" if idx in pos else None
    if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice") and parts[2].isdigit():
        idx = int(parts[2])
        pos = [c[0] for c in _ALEX_CONVS]
        return f"convs.{pos.index(idx)}.{parts[3]}" if idx in pos else None
    if parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[-1] == "weight":
        return f"heads.{int(parts[0][3:])}.weight"
    return None


def load_lpips(paths: Iterable[os.PathLike | str], device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS from local files: AlexNet backbone weights plus the v0.1 linear heads.

    Accepts any mix of torchvision's ``alexnet`` state dict (``features.N.*``; classifier keys are
    ignored), the lpips package's ``alex.pth`` heads (``linK.model.1.weight``) or a full lpips
    state dict (``net.sliceK.N.*``), as ``.pth``/``.pt`` (read with ``weights_only=True``) or
    ``.safetensors``. Every backbone and head parameter must be found, with the right shape.
    """
    model = LPIPS()
    own = model.state_dict()
    wanted = {k for k in own if k.startswith(("convs.", "heads."))}
    found: dict[str, torch.Tensor] = {}
    names = []
    for p in paths:
        path = Path(p)
        names.append(path.name)
        for key, value in _read_state(path).items():
            ours = _map_key(key)
            if ours is None or ours not in wanted:
                continue
            if tuple(value.shape) != tuple(own[ours].shape):
                raise LPIPSWeightsError(
                    f"{path.name}: {key} has shape {tuple(value.shape)}, expected {tuple(own[ours].shape)}")
            found[ours] = value.float()
    missing = sorted(wanted - set(found))
    if missing:
        raise LPIPSWeightsError(
            f"LPIPS weights incomplete in {', '.join(names) or 'no files'}: missing {len(missing)} tensors "
            f"(e.g. {missing[0]}); give torchvision's AlexNet weights and lpips' alex.pth (v0.1)")
    model.load_state_dict({**own, **found})
    return model.eval().to(device)
