"""Image metrics: agreement with scikit-image and with the SynthRAD2023 challenge's formulas."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity
from skimage.util import crop
from torch import nn

from vlhealth.image_metrics import (
    LPIPS,
    LPIPSWeightsError,
    image_metrics,
    load_lpips,
    psnr,
    ssim,
    synthrad_mae,
    synthrad_metrics,
    synthrad_psnr,
    synthrad_ssim,
    to_hu,
)


def _noisy_pair(rng: np.random.Generator, shape: tuple[int, ...], noise: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(np.int32) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.mark.parametrize("noise", [3, 40, 255])
def test_8bit_metrics_agree_with_scikit_image(noise: int) -> None:
    rng = np.random.default_rng(noise)
    for shape in [(256, 256), (37, 53)]:
        pred, target = _noisy_pair(rng, shape, noise)
        got = image_metrics(pred, target)
        assert got["ssim"] == pytest.approx(structural_similarity(target, pred), abs=1e-10)
        assert got["psnr"] == pytest.approx(peak_signal_noise_ratio(target, pred), abs=1e-10)
        assert got["mse"] == pytest.approx(mean_squared_error(target, pred), abs=1e-10)


def test_rgb_ssim_agrees_with_scikit_image() -> None:
    rng = np.random.default_rng(7)
    pred, target = _noisy_pair(rng, (64, 48, 3), 30)
    expected = structural_similarity(target, pred, channel_axis=-1)
    assert image_metrics(pred, target)["ssim"] == pytest.approx(expected, abs=1e-10)


def test_identical_and_mismatched_images() -> None:
    img = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    m = image_metrics(img, img)
    assert m["ssim"] == pytest.approx(1.0)
    assert m["mse"] == 0.0 and math.isinf(m["psnr"])
    with pytest.raises(ValueError, match="differ"):
        image_metrics(img, img[:16])
    # an RGB prediction of a grey target is compared in grey
    rgb = np.repeat(img[..., None], 3, axis=-1)
    assert image_metrics(rgb, img)["mse"] == 0.0


# -- SynthRAD2023 -----------------------------------------------------------------------------
# A direct transcription of the challenge's definitions (SynthRAD2023/metrics, image_metrics.py),
# with scikit-image doing SSIM/PSNR as the challenge does.
LO, HI = -1024.0, 3000.0


def challenge_mae(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    m = np.where(mask > 0, 1.0, 0.0)
    return float(np.sum(np.abs(gt * m - pred * m)) / m.sum())


def challenge_psnr(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    m = np.where(mask > 0, 1.0, 0.0)
    g, p = np.clip(gt, LO, HI), np.clip(pred, LO, HI)
    return float(peak_signal_noise_ratio(g[m == 1], p[m == 1], data_range=HI - LO))


def challenge_ssim(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    g, p = np.clip(gt, LO, HI), np.clip(pred, LO, HI)
    m = np.where(mask > 0, 1.0, 0.0)
    g = np.where(m == 0, LO, g) - LO
    p = np.where(m == 0, LO, p) - LO
    _, smap = structural_similarity(g, p, data_range=HI - LO, full=True)
    return float(crop(smap, 3)[crop(m, 3).astype(bool)].mean(dtype=np.float64))


def _synthetic_ct(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    mask = radius < 0.8
    gt = np.where(mask, 40.0, -1000.0) + np.where(radius < 0.3, 1200.0, 0.0)
    gt = gt + rng.normal(0, 30, shape)
    gt[tuple(s // 2 for s in shape)] = 3500.0  # outside the range: exercises the clipping
    pred = gt + rng.normal(0, 80, shape) - 25.0
    pred[(0,) * len(shape)] = -1500.0
    return gt, pred, mask


@pytest.mark.parametrize("shape", [(12, 40, 36), (64, 64)])
def test_synthrad_metrics_match_challenge_formulas(shape: tuple[int, ...]) -> None:
    gt, pred, mask = _synthetic_ct(np.random.default_rng(len(shape)), shape)
    assert synthrad_mae(gt, pred, mask) == pytest.approx(challenge_mae(gt, pred, mask), rel=1e-10)
    assert synthrad_psnr(gt, pred, mask) == pytest.approx(challenge_psnr(gt, pred, mask), rel=1e-10)
    assert synthrad_ssim(gt, pred, mask) == pytest.approx(challenge_ssim(gt, pred, mask), abs=1e-9)
    both = synthrad_metrics(gt, pred, mask)
    assert set(both) == {"mae_hu", "psnr_hu", "ssim_hu"}
    # the mask matters: unmasked numbers differ
    assert synthrad_mae(gt, pred, None) != pytest.approx(both["mae_hu"])


def test_synthrad_bad_mask() -> None:
    gt = np.zeros((16, 16))
    with pytest.raises(ValueError, match="empty"):
        synthrad_mae(gt, gt, np.zeros((16, 16)))
    with pytest.raises(ValueError, match="mask shape"):
        synthrad_psnr(gt, gt, np.ones((8, 8)))


def test_to_hu_inverts_the_window() -> None:
    img = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    hu = to_hu(img, (-1024, 3000))
    assert hu[0, 0] == -1024 and hu[0, 1] == 3000
    assert hu[1, 0] == pytest.approx(-1024 + 51 / 255 * 4024)


def test_psnr_and_ssim_data_range() -> None:
    a = np.zeros((16, 16))
    b = np.full((16, 16), 0.1)
    assert psnr(b, a, data_range=1.0) == pytest.approx(20.0)
    assert ssim(a, a, data_range=1.0) == pytest.approx(1.0)


# -- LPIPS --------------------------------------------------------------------------------------
def _torchvision_layout_features() -> nn.Sequential:
    """AlexNet's ``features`` with torchvision's module indices (built here, no torchvision)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


def _reference_lpips(features: nn.Sequential, lins: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = (1, 4, 7, 9, 11)
    hx, hy = (x - shift) / scale, (y - shift) / scale
    out = torch.zeros(x.shape[0])
    layer = 0
    for i, module in enumerate(features):
        hx, hy = module(hx), module(hy)
        if i in taps:
            nx = hx / (hx.norm(dim=1, keepdim=True) + 1e-10)
            ny = hy / (hy.norm(dim=1, keepdim=True) + 1e-10)
            out += F.conv2d((nx - ny) ** 2, lins[layer]).mean(dim=(1, 2, 3))
            layer += 1
    return out


def test_lpips_loads_torchvision_and_lpips_layouts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    features = _torchvision_layout_features()
    backbone = {f"features.{k}": v for k, v in features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(4, 4)  # ignored
    lins = [torch.rand(1, c, 1, 1) for c in (64, 192, 384, 256, 256)]
    heads = {f"lin{i}.model.1.weight": w for i, w in enumerate(lins)}
    torch.save(backbone, tmp_path / "alexnet.pth")
    save_file(heads, str(tmp_path / "alex_lin.safetensors"))

    model = load_lpips([tmp_path / "alexnet.pth", tmp_path / "alex_lin.safetensors"])
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        got = model(x, y)
        expected = _reference_lpips(features, lins, x, y)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert torch.all(got > 0)

    img = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    assert model.distance_uint8(img, img) == pytest.approx(0.0, abs=1e-7)
    assert model.distance_uint8(img, 255 - img) > 0

    # the lpips package's full state dict layout (net.sliceK.N.*) maps onto the same model
    full = {f"net.slice{s}.{k}": v for k, v in features.state_dict().items()
            for s in [{"0": 1, "3": 2, "6": 3, "8": 4, "10": 5}.get(k.split(".")[0])] if s}
    full.update(heads)
    torch.save(full, tmp_path / "lpips_full.pt")
    again = load_lpips([tmp_path / "lpips_full.pt"])
    with torch.no_grad():
        torch.testing.assert_close(again(x, y), got)


def test_lpips_refuses_incomplete_or_foreign_weights(tmp_path: Path) -> None:
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(lins, tmp_path / "alex.pth")
    with pytest.raises(LPIPSWeightsError, match="missing"):
        load_lpips([tmp_path / "alex.pth"])
    with pytest.raises(LPIPSWeightsError, match="no such"):
        load_lpips([tmp_path / "absent.pth"])
    bad = dict(lins)
    bad["lin0.model.1.weight"] = torch.rand(1, 3, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(LPIPSWeightsError, match="shape"):
        load_lpips([tmp_path / "bad.pth"])
    # a pickle holding arbitrary objects is refused by weights_only loading
    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(LPIPS))
    with pytest.raises(LPIPSWeightsError, match="cannot read"):
        load_lpips([tmp_path / "evil.pth"])
