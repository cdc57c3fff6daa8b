"""The streaming loader: task-homogeneous batches, lazy members, splits, disjoint slots, resume."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from healthgpt.model.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID, vocab_ids
from healthgpt.model.presets import build_model
from healthgpt.training.data import (
    DataConfig,
    LoaderState,
    TarReader,
    TaskBatchStream,
    VisionPreprocessor,
    make_loader,
    parse_shard_spec,
)
from tests.train_data import make_all


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_model("tiny")
    return model, tok, VisionPreprocessor.from_model(model)


def _cfg(shards: list, task: str, **kw) -> DataConfig:
    kw.setdefault("batch_size", 2)
    kw.setdefault("image_tokens", 16)
    return DataConfig(shards, task, **kw)


def _take(stream, n: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_parse_shard_spec() -> None:
    assert parse_shard_spec("a/b").weight == 1.0
    spec = parse_shard_spec("a/b:2.5")
    assert spec.path == Path("a/b") and spec.weight == 2.5
    assert parse_shard_spec("c:/x").path == Path("c:/x")  # not a weight: part of the path
    with pytest.raises(ValueError, match="weight"):
        parse_shard_spec("a:0")


def test_mixed_batches_are_single_task_with_masked_labels(shards, tiny) -> None:
    model, tok, pre = tiny
    vocab = vocab_ids(tok)
    stream = TaskBatchStream(_cfg([shards["comp"], shards["gen"]], "mixed"), tok, pre)
    tasks = Counter()
    for b in _take(stream, 12):
        tasks[b["task"]] += 1
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
        assert b["pixel_values"].shape[0] == int((b["input_ids"] == IMAGE_TOKEN_ID).sum()) == 2
        assert all(k.startswith("toy-lgen" if b["task"] == "generation" else "toy-") for k in b["keys"])
        lab = b["labels"][b["labels"] != IGNORE_INDEX]
        if b["task"] == "generation":
            # the whole image span is supervised: start, 1024 codes, end (+ the template's stop)
            assert int(((lab >= vocab.idx_0) & (lab < vocab.idx_0 + 8192)).sum()) == 2 * 1024
            assert int((lab == vocab.start_index).sum()) == 2 and int((lab == vocab.end_index).sum()) == 2
        else:
            assert 0 < lab.numel() < 40  # only the short answers (+ stop token)
        assert not bool((b["labels"][b["attention_mask"] == 0] != IGNORE_INDEX).any())
    assert set(tasks) == {"comprehension", "generation"}


def test_generation_reads_vq_not_target_png(shards, tiny, monkeypatch) -> None:
    _, tok, pre = tiny
    asked: list[str] = []
    orig = TarReader.read

    def spy(self, path, key, suffixes):
        asked.extend(suffixes)
        return orig(self, path, key, suffixes)

    monkeypatch.setattr(TarReader, "read", spy)
    batches = _take(TaskBatchStream(_cfg([shards["gen_png"]], "generation"), tok, pre), 2)
    assert all(b["task"] == "generation" for b in batches)
    assert "target.vq.npy" in asked and "target.png" not in asked


def test_only_the_requested_split(shards, tiny) -> None:
    _, tok, pre = tiny
    seen = {k for b in _take(TaskBatchStream(_cfg([shards["comp"]], "comprehension", batch_size=4), tok, pre), 12)
            for k in b["keys"]}
    assert len(seen) == 24 and not any(k >= "toy-00100" for k in seen)  # all 24 train samples, no val
    val = {k for b in _take(TaskBatchStream(_cfg([shards["comp"]], "comprehension", split="val"), tok, pre), 4)
           for k in b["keys"]}
    assert val == {f"toy-{100 + i:05d}" for i in range(4)}


def test_missing_task_is_a_clear_error(shards, tiny) -> None:
    _, tok, pre = tiny
    with pytest.raises(ValueError, match="no 'train' samples of task 'generation'"):
        TaskBatchStream(_cfg([shards["comp"]], "generation"), tok, pre)


@pytest.mark.parametrize("source", ["comp", "bright"])  # 4 shards (whole-shard split) / 4 shards of 6
def test_ranks_and_workers_read_disjoint_data(shards, tiny, source) -> None:
    _, tok, pre = tiny
    per_slot = []
    for rank in range(2):
        for worker in range(2):
            cfg = _cfg([shards[source]], "comprehension", num_workers=2)
            stream = TaskBatchStream(cfg, tok, pre, rank=rank, world_size=2, state={"rotate": worker})
            keys = [k for b in _take(stream, 3) for k in b["keys"]]
            per_slot.append(set(keys))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not per_slot[i] & per_slot[j]


def test_reshuffled_every_pass(shards, tiny) -> None:
    _, tok, pre = tiny
    keys = [k for b in _take(TaskBatchStream(_cfg([shards["bright"]], "comprehension", batch_size=4), tok, pre), 12)
            for k in b["keys"]]
    first, second = keys[:24], keys[24:48]
    assert set(first) == set(second) and len(set(first)) == 24 and first != second


def test_mixing_weights(shards, tiny) -> None:
    _, tok, pre = tiny
    stream = TaskBatchStream(_cfg([f"{shards['comp']}:3", f"{shards['bright']}:1"], "comprehension",
                                  batch_size=1), tok, pre)
    src = Counter("bright" if b["keys"][0].startswith("bright") else "comp" for b in _take(stream, 200))
    assert 0.65 < src["comp"] / 200 < 0.85


def test_pack_fills_rows_up_to_max_len(shards, tiny) -> None:
    _, tok, pre = tiny
    cfg = _cfg([shards["comp"]], "comprehension", batch_size=2, pack=True, max_len=256)
    for b in _take(TaskBatchStream(cfg, tok, pre), 3):
        assert b["input_ids"].shape[0] == 2 and b["n_samples"] > 2
        n_img = (b["input_ids"] == IMAGE_TOKEN_ID).sum(1)
        positions = b["attention_mask"].sum(1) + n_img * 15
        assert int(positions.max()) <= 256
        assert b["pixel_values"].shape[0] == b["n_samples"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_at_the_same_batch(shards, tiny, workers) -> None:
    _, tok, pre = tiny
    cfg = _cfg([shards["comp"], shards["bright"]], "comprehension", num_workers=workers, pack=workers == 2,
               max_len=300)
    loader, state = make_loader(cfg, tok, pre)
    it = iter(loader)
    full = []
    for i in range(9):
        b = next(it)
        full.append(b["keys"])
        if i < 5:
            state.update(b)
    saved = state.to_dict()
    del it, loader
    loader2, _ = make_loader(cfg, tok, pre, state=LoaderState.from_dict(saved, workers))
    it2 = iter(loader2)
    resumed = [next(it2)["keys"] for _ in range(4)]
    assert resumed == full[5:]
    with pytest.raises(ValueError, match="num-workers"):
        LoaderState.from_dict(saved, workers + 3)


def test_collated_tensors_feed_the_model(shards, tiny) -> None:
    model, tok, pre = tiny
    b = _take(TaskBatchStream(_cfg([shards["gen"]], "generation", batch_size=1), tok, pre), 1)[0]
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"], task=b["task"],
                    return_logits=False)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("side", [32, 336])
def test_fast_preprocessing_matches_the_clip_processor(side) -> None:
    """FastClipPreprocessor (the loader's default) == HierarchicalVision.preprocess with the CLIP
    processor: gray and RGB, square and not, up- and down-sampling, PNG and JPEG decoded."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    from healthgpt.model.presets import CLIP_MEAN, CLIP_STD
    from healthgpt.training.data import FastClipPreprocessor, decode_input_image

    proc = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                 image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
    slow, fast = VisionPreprocessor(proc), VisionPreprocessor(proc, fast=True)
    assert isinstance(fast.fast, FastClipPreprocessor) and slow.fast is None
    rng = np.random.default_rng(side)
    arrays = [rng.integers(0, 256, (256, 256), dtype=np.uint8), rng.integers(0, 256, (120, 300), dtype=np.uint8),
              rng.integers(0, 256, (301, 200, 3), dtype=np.uint8), rng.integers(0, 256, (512, 512, 3), dtype=np.uint8),
              rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)]
    images = []
    for arr in arrays:
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format=fmt)
            images.append(decode_input_image(buf.getvalue(), f"x.{fmt.lower()}"))
    assert {im.mode for im in images} == {"L", "RGB"}
    want, got = slow(images), fast(images)
    assert got.shape == want.shape == (len(images), 3, side, side) and got.dtype == want.dtype == torch.float32
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    # a setting it does not reproduce falls back to the processor
    assert FastClipPreprocessor.from_processor(CLIPImageProcessorPil(do_normalize=False)) is None


# ------------------------------------------------------------------------------------ streaming mode


def _pattern(folder: Path, prefix: str, scheme: str = "") -> str:
    tars = sorted(p.name for p in folder.glob(f"{prefix}-*.tar"))
    first, last = tars[0].split("-")[1].split(".")[0], tars[-1].split("-")[1].split(".")[0]
    return f"{scheme}{folder}/{prefix}-{{{first}..{last}}}.tar"


def test_parse_shard_spec_urls() -> None:
    spec = parse_shard_spec("https://host/data/vqa-{000000..000009}.tar:2")
    assert spec.remote and spec.url == "https://host/data/vqa-{000000..000009}.tar" and spec.weight == 2
    assert spec.path.name == "vqa-{000000..000009}.tar"  # a display name: no host
    spec = parse_shard_spec("pipe:curl -s https://host/x.tar")
    assert spec.remote and spec.weight == 1 and spec.url == "pipe:curl -s https://host/x.tar"
    assert parse_shard_spec("file:///data/x.tar:0.5").url == "file:///data/x.tar"
    assert not parse_shard_spec("demo/shards/vqa_rad:3").remote


def test_streaming_batches_match_the_local_mode(shards, tiny) -> None:
    """A brace pattern of plain local paths goes through webdataset; every sample is decoded,
    tokenised and pre-processed exactly as the local random-access mode does it."""
    _, tok, pre = tiny
    local = {}
    for b in _take(TaskBatchStream(_cfg([shards["comp"]], "comprehension", batch_size=1), tok, pre), 24):
        local[b["keys"][0]] = b
    stream = TaskBatchStream(_cfg([_pattern(shards["comp"], "comp")], "comprehension", batch_size=1), tok, pre)
    assert stream.streaming
    seen = []
    for b in _take(stream, 30):
        key = b["keys"][0]
        seen.append(key)
        assert key in local  # train split only: the 4 val samples never come
        for name in ("input_ids", "labels", "attention_mask", "pixel_values"):
            assert torch.equal(b[name], local[key][name]), (key, name)
        assert b["state"]["streaming"]
    assert len(set(seen)) > 10


@pytest.mark.parametrize("forced", [True, False])
def test_streaming_mixed_batches_are_single_task(shards, tiny, forced) -> None:
    """Forced streaming of local folders (task weights from their counts) and file:// URL patterns
    (task of the next sample)."""
    _, tok, pre = tiny
    srcs = ([shards["comp"], shards["gen"]] if forced
            else [_pattern(shards["comp"], "comp", "file://"), _pattern(shards["gen"], "gen", "file://")])
    stream = TaskBatchStream(_cfg(srcs, "mixed", streaming=forced), tok, pre)
    tasks = Counter()
    for b in _take(stream, 12):
        tasks[b["task"]] += 1
        assert all(k.startswith("toy-lgen") == (b["task"] == "generation") for k in b["keys"])
        assert b["pixel_values"].shape[0] == 2
    assert set(tasks) == {"comprehension", "generation"}


def test_streaming_splits_shards_by_rank_and_worker(shards, tiny) -> None:
    _, tok, pre = tiny
    per_slot = []
    for rank in range(2):
        for worker in range(2):  # comp has 4 shards: one whole shard per reading slot
            cfg = _cfg([shards["comp"]], "comprehension", num_workers=2, streaming=True)
            stream = TaskBatchStream(cfg, tok, pre, rank=rank, world_size=2, state={"rotate": worker})
            per_slot.append({k for b in _take(stream, 4) for k in b["keys"]})
    for i in range(4):
        for j in range(i + 1, 4):
            assert not per_slot[i] & per_slot[j]


def test_streaming_resume_restarts_the_stream(shards, tiny) -> None:
    _, tok, pre = tiny
    cfg = _cfg([shards["bright"]], "comprehension", streaming=True, batch_size=4)
    loader, state = make_loader(cfg, tok, pre)
    it = iter(loader)
    first = []
    for _ in range(3):
        b = next(it)
        state.update(b)
        first.append(b["keys"])
    again = [next(iter(make_loader(cfg, tok, pre)[0]))["keys"]]
    assert again == first[:1]  # same seed, fresh start: the same stream
    loader2, _ = make_loader(cfg, tok, pre, state=LoaderState.from_dict(state.to_dict(), 0))
    b = next(iter(loader2))
    assert b["state"]["batches"] == 4  # the batch count goes on; the data is a new shuffle
    assert b["keys"] != first[0]
