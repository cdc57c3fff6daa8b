"""VQGAN tokenizer: shapes, determinism, taming checkpoint layout, conversion, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vlhealth import vq
from vlhealth.vq import (
    CODEBOOK_SIZE,
    GRID,
    TOKENS_PER_IMAGE,
    VQGAN,
    VQCheckpointError,
    VQConfig,
    convert_checkpoint,
    load_vq,
)

# small but complete layout: attention at 32 (the f8 placement), widths change between levels
SMALL = VQConfig(
    ch=8,
    ch_mult=(1, 1, 2, 4),
    num_res_blocks=1,
    attn_resolutions=(32,),
    z_channels=16,
    embed_dim=16,
    norm_groups=4,
)


def _images(n: int, rgb: bool = False) -> np.ndarray:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:256, 0:256]
    imgs = [
        ((np.sin(xx / (4 + 3 * i)) * np.cos(yy / (6 + i)) + 1) * 120 + rng.normal(0, 4, (256, 256))) for i in range(n)
    ]
    arr = np.stack(imgs).clip(0, 255).astype(np.uint8)
    if rgb:
        arr = np.stack([arr, 255 - arr, arr // 2], axis=-1)
    return arr


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # the test machine is shared: OpenMP threads on a busy box are several times slower than one
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> vq.VQTokenizer:
    return load_vq("tiny", batch_size=4)


@pytest.fixture(scope="module")
def taming_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VQGAN]:
    """A Lightning-style checkpoint in the taming key layout, with training-only extras."""
    torch.manual_seed(3)
    model = VQGAN(SMALL).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-wired load would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = dict(model.state_dict())
    state["loss.logvar"] = torch.zeros(())
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 1234, "epoch": 3}, path)
    return path, model


def _reference_codes(model: VQGAN, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)
    x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = model.quantize.proj(model.quant_conv(model.encoder(x)))
    return logits.argmax(1).flatten(1).numpy()


def test_constants_and_real_layout_key_names() -> None:
    assert (CODEBOOK_SIZE, GRID, TOKENS_PER_IMAGE) == (8192, 32, 1024)
    with torch.device("meta"):
        model = VQGAN(vq.GUMBEL_F8_CONFIG)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # 301 tensors, as in taming's GumbelVQ without its loss module (checked against taming's modules)
    assert len(shapes) == 301
    assert sum(int(np.prod(s)) for s in shapes.values()) == 68_995_971
    assert shapes["quantize.proj.weight"] == (8192, 256, 1, 1)
    assert shapes["quantize.embed.weight"] == (8192, 256)
    assert shapes["quant_conv.weight"] == (256, 256, 1, 1)
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.down.2.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down.3.attn.1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.down.2.downsample.conv.weight"] == (256, 256, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert shapes["decoder.up.3.attn.2.q.bias"] == (512,)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.mid.attn_1.norm.weight"] == (512,)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)


def test_encode_decode_shapes_and_dtypes(tiny: vq.VQTokenizer) -> None:
    grey = _images(5)
    codes = tiny.encode(grey)
    assert codes.shape == (5, TOKENS_PER_IMAGE) and codes.dtype == np.int16
    assert codes.min() >= 0 and codes.max() < CODEBOOK_SIZE
    # codes follow the content: not one index, and different images differ
    assert np.unique(codes).size > 50
    assert not np.array_equal(codes[0], codes[1])
    single = tiny.encode(grey[0])
    assert single.shape == (1, TOKENS_PER_IMAGE)
    np.testing.assert_array_equal(single[0], codes[0])
    rgb_single = tiny.encode(_images(1, rgb=True)[0])
    assert rgb_single.shape == (1, TOKENS_PER_IMAGE)
    # a grey image is its own three-channel repeat
    np.testing.assert_array_equal(tiny.encode(np.repeat(grey[:2, ..., None], 3, axis=-1)), codes[:2])

    images = tiny.decode(codes)
    assert images.shape == (5, 256, 256, 3) and images.dtype == np.uint8
    assert images.std() > 0
    assert tiny.decode(codes[0]).shape == (1, 256, 256, 3)
    np.testing.assert_array_equal(tiny.decode(codes.reshape(5, GRID, GRID).astype(np.int64)), images)


def test_tiny_is_deterministic_across_loads_and_batching(tiny: vq.VQTokenizer) -> None:
    imgs = _images(5, rgb=True)
    same = load_vq("tiny", batch_size=tiny.batch_size)
    a = tiny.encode(imgs)
    np.testing.assert_array_equal(same.encode(imgs), a)
    np.testing.assert_array_equal(same.decode(a), tiny.decode(a))
    assert tiny.describe() == same.describe()
    # another batch size may pick other conv kernels: codes agree here, pixels within one level
    other = load_vq("tiny", batch_size=32)
    np.testing.assert_array_equal(other.encode(imgs), a)
    diff = np.abs(other.decode(a).astype(int) - tiny.decode(a).astype(int))
    assert diff.max() <= 1
    w1, w2 = tiny.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_tiny_describe(tiny: vq.VQTokenizer) -> None:
    info = tiny.describe()
    json.dumps(info)
    assert info["name"] == "tiny" and info["random_weights"] is True
    assert info["note"] == "tiny random VQGAN: indices are not meaningful image tokens"
    assert len(info["sha256"]) == 64
    assert info["config"]["n_embed"] == CODEBOOK_SIZE


def test_tiny_product_codebook_scores_like_the_full_proj(tiny: vq.VQTokenizer) -> None:
    # the tiny quantiser scores 128 + 64 factor rows; the codes are the dense argmax of proj(z)
    imgs = _images(6)
    assert tiny.model.quantize.product == vq.TINY_PRODUCT
    np.testing.assert_array_equal(tiny.encode(imgs), _reference_codes(tiny.model, imgs))
    with pytest.raises(ValueError, match="not a product codebook"):
        VQGAN(SMALL).quantize.use_product(128, 8)
    with pytest.raises(ValueError, match="does not fit"):
        VQGAN(SMALL).quantize.use_product(100, 8)


def test_load_taming_lightning_checkpoint(taming_ckpt: tuple[Path, VQGAN]) -> None:
    path, model = taming_ckpt
    tok = load_vq(path, config=SMALL, batch_size=2)
    imgs = _images(3)
    codes = tok.encode(imgs)
    np.testing.assert_array_equal(codes, _reference_codes(model, imgs))
    with torch.no_grad():
        expected = model.decode_codes(torch.from_numpy(codes.astype(np.int64)))
    expected_u8 = expected.clamp(-1, 1).add(1).mul(127.5).round().permute(0, 2, 3, 1).to(torch.uint8)
    # same weights, other memory layout and kernels: equal up to rounding at a level boundary
    diff = np.abs(tok.decode(codes).astype(int) - expected_u8.numpy().astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    info = tok.describe()
    assert info["name"] == "last.ckpt" and info["random_weights"] is False
    assert info["ignored_checkpoint_keys"] == 2 and "note" not in info
    assert str(path.parent) not in json.dumps(info)


def test_taming_model_yaml_beside_checkpoint(taming_ckpt: tuple[Path, VQGAN], tmp_path: Path) -> None:
    path, model = taming_ckpt
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(path.read_bytes())
    dd = {k: v for k, v in SMALL.to_dict().items() if k not in ("embed_dim", "n_embed", "norm_groups")}
    params = {"embed_dim": 16, "n_embed": 8192, "ddconfig": {**dd, "norm_groups": 4}}
    (ckpt.parent / "model.yaml").write_text(
        yaml.safe_dump({"model": {"target": "taming.models.vqgan.GumbelVQ", "params": params}})
    )
    imgs = _images(2)
    np.testing.assert_array_equal(load_vq(ckpt).encode(imgs), _reference_codes(model, imgs))


def test_convert_to_safetensors_round_trip(taming_ckpt: tuple[Path, VQGAN], tmp_path: Path) -> None:
    from safetensors import safe_open

    path, _ = taming_ckpt
    out = tmp_path / "vqgan.safetensors"
    summary = convert_checkpoint(path, out, config=SMALL)
    assert summary["dropped_keys"] == 2 and summary["out"] == "vqgan.safetensors"
    with safe_open(str(out), framework="pt") as fh:
        assert not any(k.startswith("loss.") for k in fh.keys())  # noqa: SIM118
        assert VQConfig.from_dict(json.loads(fh.metadata()["vq_config"])) == SMALL
    assert VQConfig.from_dict(json.loads(out.with_suffix(".json").read_text())) == SMALL
    converted = load_vq(out)  # config from the safetensors metadata
    original = load_vq(path, config=SMALL)
    imgs = _images(3, rgb=True)
    codes = original.encode(imgs)
    np.testing.assert_array_equal(converted.encode(imgs), codes)
    np.testing.assert_array_equal(converted.decode(codes), original.decode(codes))
    assert converted.describe()["name"] == "vqgan.safetensors"
    assert converted.describe()["sha256"] == summary["sha256"]


def test_missing_keys_and_wrong_shapes_are_named(taming_ckpt: tuple[Path, VQGAN], tmp_path: Path) -> None:
    path, model = taming_ckpt
    state = dict(model.state_dict())
    del state["decoder.mid.attn_1.q.weight"]
    broken = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, broken)
    with pytest.raises(VQCheckpointError, match=r"broken\.ckpt.*missing keys: decoder\.mid\.attn_1\.q\.weight"):
        load_vq(broken, config=SMALL)

    wrong = VQConfig(**{**SMALL.to_dict(), "z_channels": 32, "embed_dim": 32})
    with pytest.raises(VQCheckpointError, match=r"last\.ckpt.*shape mismatches: .*encoder\.conv_out\.weight"):
        load_vq(path, config=wrong)
    with pytest.raises(VQCheckpointError, match=r"last\.ckpt"):
        convert_checkpoint(path, tmp_path / "x.safetensors", config=wrong)

    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_vq(tmp_path / "nowhere.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(VQCheckpointError, match="garbage.ckpt"):
        load_vq(garbage)


def test_bad_inputs_raise(tiny: vq.VQTokenizer) -> None:
    codes = np.zeros((2, TOKENS_PER_IMAGE), dtype=np.int64)
    codes[1, 5] = CODEBOOK_SIZE
    with pytest.raises(ValueError, match="8191"):
        tiny.decode(codes)
    with pytest.raises(ValueError, match="-1"):
        tiny.decode(np.full((1, TOKENS_PER_IMAGE), -1))
    with pytest.raises(ValueError, match="integer"):
        tiny.decode(np.zeros((1, TOKENS_PER_IMAGE), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[N,1024\]"):
        tiny.decode(np.zeros((1, 1000), dtype=np.int16))
    with pytest.raises(ValueError, match="uint8"):
        tiny.encode(np.zeros((1, 256, 256), dtype=np.float32))
    with pytest.raises(ValueError, match="256"):
        tiny.encode(np.zeros((1, 128, 128), dtype=np.uint8))
    with pytest.raises(ValueError, match="256"):
        tiny.encode(np.zeros((1, 256, 256, 4), dtype=np.uint8))
