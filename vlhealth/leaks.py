"""Leakage guard: perceptual hashes of every image, near-duplicate search of train against test.

A test image that reappears in a training source — copied, recompressed, resized — inflates
evaluation scores. Two images are reported as the same picture when

1. their 64-bit **pHash** (DCT of a 32x32 grey thumbnail, 8x8 low frequencies against their
   median) differ in at most ``max_distance`` bits, and
2. the normalised cross-correlation of their 32x32 grey thumbnails is at least
   ``min_similarity`` (this second check removes the hash collisions that look-alike images such
   as chest X-rays produce: two different phantom radiographs of the demo data reach pHash
   distance 6 and correlation 0.96, while a copy resized to 75% and recompressed at JPEG quality
   70 stays at distance 2 and correlation 0.999 — hence the default 0.98).

Candidates are found with multi-index hashing: the 64 bits are cut into ``max_distance + 1``
chunks; two hashes within ``max_distance`` bits agree exactly on at least one chunk (pigeonhole),
so one dictionary look-up per chunk finds every candidate without comparing all pairs.

Comprehension builders store ``extra.phash``/``extra.dhash`` (hex) with every sample
(:func:`image_hashes`), so a check only decodes test images and the few train candidates.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from vlhealth.shards import iter_tar, list_shards

HASH_BITS = 64
THUMB = 32
DEFAULT_MAX_DISTANCE = 8
DEFAULT_MIN_SIMILARITY = 0.98
IMAGE_MEMBERS = ("input.jpg", "input.png")


# -- hashes --------------------------------------------------------------------------------------
def _resize(grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-averaged resize (width, height) of a 2-D array, as float64."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(grey).astype(np.uint8) if grey.dtype != np.uint8 else grey)
    return np.asarray(img.resize(size, Image.Resampling.BOX), dtype=np.float64)


def to_grey(data: bytes) -> np.ndarray:
    """Decode image bytes to an 8-bit luminance array."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        return np.asarray(img.convert("L"))


def _bits_to_int(bits: np.ndarray) -> int:
    out = 0
    for b in bits.ravel():
        out = (out << 1) | int(bool(b))
    return out


def phash(grey: np.ndarray) -> int:
    """64-bit perceptual hash: sign of the 8x8 lowest DCT frequencies against their median."""
    from scipy.fft import dctn

    small = _resize(grey, (THUMB, THUMB))
    low = dctn(small, norm="ortho")[:8, :8]
    median = np.median(low.ravel()[1:])  # the DC term would dominate the median
    return _bits_to_int(low > median)


def dhash(grey: np.ndarray) -> int:
    """64-bit difference hash: is each pixel of a 9x8 thumbnail brighter than its right neighbour."""
    small = _resize(grey, (9, 8))
    return _bits_to_int(small[:, :-1] > small[:, 1:])


def thumbnail(grey: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm 32x32 thumbnail (float32) for the correlation check."""
    t = _resize(grey, (THUMB, THUMB)).ravel()
    t = t - t.mean()
    norm = float(np.linalg.norm(t))
    return (t / norm if norm > 1e-9 else t).astype(np.float32)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two thumbnails (1.0 for two flat images)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na < 1e-6 and nb < 1e-6:
        return 1.0
    if na < 1e-6 or nb < 1e-6:
        return 0.0
    return float(np.dot(a.astype(np.float32), b.astype(np.float32)))


def image_hashes(grey: np.ndarray) -> dict[str, str]:
    """``{"phash": hex, "dhash": hex}`` as stored in ``Record.extra``."""
    return {"phash": f"{phash(grey):016x}", "dhash": f"{dhash(grey):016x}"}


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# -- the index of test images --------------------------------------------------------------------
@dataclass(frozen=True)
class LeakMatch:
    key: str  # the test sample
    source: str
    group: str
    distance: int
    similarity: float


@dataclass
class LeakIndex:
    """Test images, searchable for near-duplicates (multi-index hashing + thumbnail correlation)."""

    max_distance: int = DEFAULT_MAX_DISTANCE
    min_similarity: float = DEFAULT_MIN_SIMILARITY
    keys: list[tuple[str, str, str]] = field(default_factory=list)  # (key, source, group)
    hashes: list[int] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)
    _tables: list[dict[int, list[int]]] = field(default_factory=list)
    _seen: dict[str, int] = field(default_factory=dict)  # image sha256 -> entry (one entry per image)

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance < HASH_BITS:
            raise ValueError(f"max_distance must be in [0, {HASH_BITS})")
        m = self.max_distance + 1
        edges = np.linspace(0, HASH_BITS, m + 1).round().astype(int)
        self._chunks = [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        self._tables = [{} for _ in self._chunks]

    def _parts(self, h: int) -> Iterator[tuple[int, int]]:
        for i, (lo, hi) in enumerate(self._chunks):
            yield i, (h >> lo) & ((1 << (hi - lo)) - 1)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, source: str, group: str, h: int, thumb: np.ndarray, digest: str | None = None) -> None:
        if digest is not None and digest in self._seen:
            return
        n = len(self.keys)
        if digest is not None:
            self._seen[digest] = n
        self.keys.append((key, source, group))
        self.hashes.append(h)
        self.thumbs.append(np.asarray(thumb, dtype=np.float16))  # 2 KB per test image
        for i, part in self._parts(h):
            self._tables[i].setdefault(part, []).append(n)

    def add_bytes(self, key: str, source: str, group: str, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._seen:
            return
        grey = to_grey(data)
        self.add(key, source, group, phash(grey), thumbnail(grey), digest)

    def candidates(self, h: int) -> list[tuple[int, int]]:
        """(entry, distance) of every test hash within ``max_distance`` bits of ``h``."""
        found: set[int] = set()
        for i, part in self._parts(h):
            found.update(self._tables[i].get(part, ()))
        out = [(n, hamming(h, self.hashes[n])) for n in sorted(found)]
        return [(n, d) for n, d in out if d <= self.max_distance]

    def match(self, h: int, thumb_of: Callable[[], np.ndarray]) -> LeakMatch | None:
        """The closest test image that ``h`` (thumbnail computed lazily) duplicates, or None."""
        cands = self.candidates(h)
        if not cands:
            return None
        thumb = thumb_of()
        best: LeakMatch | None = None
        for n, d in cands:
            sim = similarity(thumb, self.thumbs[n])
            if sim >= self.min_similarity and (best is None or (d, -sim) < (best.distance, -best.similarity)):
                key, source, group = self.keys[n]
                best = LeakMatch(key, source, group, d, round(sim, 4))
        return best

    def match_grey(self, grey: np.ndarray, hashes: dict[str, str] | None = None) -> LeakMatch | None:
        h = int(hashes["phash"], 16) if hashes else phash(grey)
        return self.match(h, lambda: thumbnail(grey))

    @classmethod
    def from_shards(cls, sources: Iterable[os.PathLike | str], *, max_distance: int = DEFAULT_MAX_DISTANCE,
                    min_similarity: float = DEFAULT_MIN_SIMILARITY) -> LeakIndex:
        """Index of the input images of every ``split == "test"`` sample in the given shards."""
        index = cls(max_distance=max_distance, min_similarity=min_similarity)
        for key, record, data in iter_images(sources):
            if record.get("split") == "test":
                index.add_bytes(key, str(record.get("source")), str(record.get("group")), data)
        return index


@lru_cache(maxsize=4)
def load_leak_index(paths: tuple[str, ...]) -> LeakIndex:
    """Cached :meth:`LeakIndex.from_shards` (a build process loads its ``--drop-leaks`` index once)."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"--drop-leaks: no such shard folder or tar: {', '.join(missing)}")
    return LeakIndex.from_shards(paths)


# -- checking shards ------------------------------------------------------------------------------
def iter_images(sources: Iterable[os.PathLike | str]) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """(key, record, input image bytes) of every sample with an input image."""
    import json

    for tar in list_shards(list(sources)):
        for key, members in iter_tar(tar):
            data = next((members[m] for m in IMAGE_MEMBERS if m in members), None)
            if data is None or "json" not in members:
                continue
            yield key, json.loads(members["json"]), data


@dataclass
class Leak:
    key: str  # the train/val sample
    source: str
    split: str
    group: str
    test_key: str
    test_source: str
    test_group: str
    distance: int
    similarity: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def find_leaks(
    sources: Iterable[os.PathLike | str],
    *,
    test_sources: Iterable[os.PathLike | str] | None = None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Leak], dict[str, int]]:
    """Train/val samples of ``sources`` whose image near-duplicates a test image.

    Test images come from ``test_sources`` (default: the test samples of ``sources`` themselves).
    Returns the leaks (sorted by key) and counts (``test_images``, ``checked``).
    """
    sources = list(sources)
    index = LeakIndex.from_shards(test_sources if test_sources is not None else sources,
                                  max_distance=max_distance, min_similarity=min_similarity)
    leaks: list[Leak] = []
    checked = 0
    verdicts: dict[str, LeakMatch | None] = {}  # image sha256 -> match (images repeat across QAs)
    for key, record, data in iter_images(sources):
        if record.get("split") == "test":
            continue
        checked += 1
        if progress:
            progress(checked)
        digest = hashlib.sha256(data).hexdigest()
        if digest not in verdicts:
            stored = (record.get("extra") or {}).get("phash")
            if stored:
                h = int(stored, 16)
                verdicts[digest] = index.match(h, lambda d=data: thumbnail(to_grey(d)))
            else:
                grey = to_grey(data)
                verdicts[digest] = index.match(phash(grey), lambda g=grey: thumbnail(g))
        m = verdicts[digest]
        if m is not None:
            leaks.append(Leak(key, str(record.get("source")), str(record.get("split")), str(record.get("group")),
                              m.key, m.source, m.group, m.distance, m.similarity))
    leaks.sort(key=lambda x: x.key)
    return leaks, {"test_images": len(index), "checked": checked, "leaks": len(leaks),
                   "leaked_images": len({(x.source, x.group) for x in leaks})}
