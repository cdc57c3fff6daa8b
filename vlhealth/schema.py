"""The VL-Health sample: one WebDataset sample = one training/eval example.

See the README ("The sample") and ARCHITECTURE.md ("Contracts"). A :class:`Sample` holds a validated
:class:`Record` (the ``json`` member) plus its image members. Everything that writes shards goes
through :meth:`Sample.to_members`, everything that reads them through :meth:`Sample.from_members`,
so the on-disk format is defined here once.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import zlib
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

IMAGE_TOKEN = "<image>"
TARGET_IMAGE_TOKEN = "<target_image>"

TASKS = ("comprehension", "generation")
SUBTASKS = {
    "comprehension": ("vqa", "caption", "conversation", "report"),
    "generation": ("ct2mri", "mri2ct", "sr4x", "recon", "report2cxr"),
}
SPLITS = ("train", "val", "test")
ANSWER_TYPES = ("open", "closed", "choice")
ROLES = ("human", "gpt")

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Members a sample may carry besides the standard ones (e.g. the 16-bit reference slice
# that eval splits keep for HU metrics). Names are `<stem>.<ext>` without the key.
EXTRA_MEMBER_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")
STANDARD_MEMBERS = ("json", "input.png", "input.jpg", "target.png", "target.vq.npy")

VQ_GRID = 32
VQ_LENGTH = VQ_GRID * VQ_GRID  # 1024 indices per 256x256 image
VQ_CODEBOOK = 8192
TARGET_SIZE = 256


class SchemaError(ValueError):
    """A sample that does not follow the schema; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str, key: str | None = None):
        self.field = field_name
        self.key = key
        where = f"sample {key!r}: " if key else ""
        super().__init__(f"{where}field {field_name!r}: {message}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SchemaError(name, f"{value!r} is not one of {list(allowed)}")


def safe_key(*parts: str | int) -> str:
    """Join parts into a key of the allowed charset (anything else becomes ``_``)."""
    raw = "-".join(str(p) for p in parts if str(p) != "")
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_")
    if not key:
        raise SchemaError("key", f"no usable characters in {parts!r}")
    return key


@dataclass
class Record:
    """The ``json`` member of a sample. Validated on construction."""

    task: str
    subtask: str
    source: str
    split: str
    conversations: list[dict[str, str]]
    group: str
    license: str
    answer_type: str | None = None
    options: list[str] | None = None
    modality: str | None = None
    body_part: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASKS)
        _check_choice("subtask", self.subtask, SUBTASKS[self.task])
        _check_choice("split", self.split, SPLITS)
        for name in ("source", "group", "license"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise SchemaError(name, "must be a non-empty string")
        self._check_conversations()
        if self.answer_type is not None:
            _check_choice("answer_type", self.answer_type, ANSWER_TYPES)
        if self.task == "comprehension" and self.answer_type is None:
            raise SchemaError("answer_type", "comprehension samples need open/closed/choice")
        if self.answer_type == "choice":
            if not self.options or len(self.options) < 2:
                raise SchemaError("options", "a 'choice' sample needs at least two options")
            if any(not isinstance(o, str) or not o.strip() for o in self.options):
                raise SchemaError("options", "options must be non-empty strings")
            answer = self.conversations[-1]["value"].strip()
            if answer not in [o.strip() for o in self.options] and not re.match(r"^[A-Z][.:)]?\s", answer):
                # The answer is either an option's text or starts with its letter ("B. text").
                raise SchemaError("options", f"answer {answer!r} is none of the options")
        elif self.options is not None:
            raise SchemaError("options", f"only 'choice' samples carry options (got {self.answer_type!r})")
        if not isinstance(self.provenance, dict):
            raise SchemaError("provenance", "must be a mapping")
        for k, v in self.provenance.items():
            if isinstance(v, str) and (v.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", v)):
                raise SchemaError("provenance", f"{k!r} is an absolute path; store it relative to the source root")

    def _check_conversations(self) -> None:
        conv = self.conversations
        if not isinstance(conv, list) or len(conv) < 2:
            raise SchemaError("conversations", "needs at least one human and one gpt turn")
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
                raise SchemaError("conversations", f"turn {i} must be {{'from','value'}}, got {turn!r}")
            expected = ROLES[i % 2]
            if turn["from"] != expected:
                raise SchemaError("conversations", f"turn {i} is from {turn['from']!r}, expected {expected!r}")
            if not isinstance(turn["value"], str) or not turn["value"].strip():
                raise SchemaError("conversations", f"turn {i} has an empty value")
        if len(conv) % 2:
            raise SchemaError("conversations", "must end with a gpt turn")
        if any(IMAGE_TOKEN in t["value"] for t in conv if t["from"] == "gpt"):
            raise SchemaError("conversations", f"{IMAGE_TOKEN} may only appear in human turns")
        n_targets = sum(t["value"].count(TARGET_IMAGE_TOKEN) for t in conv)
        if self.task == "generation":
            if n_targets != 1 or TARGET_IMAGE_TOKEN not in conv[-1]["value"]:
                raise SchemaError("conversations", f"a generation sample's last gpt turn holds {TARGET_IMAGE_TOKEN} once")
        elif n_targets:
            raise SchemaError("conversations", f"{TARGET_IMAGE_TOKEN} only belongs in generation samples")

    @property
    def n_images(self) -> int:
        return sum(t["value"].count(IMAGE_TOKEN) for t in self.conversations)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SchemaError(sorted(unknown)[0], "unknown field")
        missing = [f.name for f in fields(cls)
                   if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
        try:
            return cls(**data)
        except TypeError as exc:
            raise SchemaError(missing[0] if missing else "json", str(exc)) from exc


def image_format(data: bytes) -> str:
    """``png`` or ``jpg`` from the magic number (upstream JPEG bytes are kept as they are)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    raise SchemaError("input", "image bytes are neither PNG nor JPEG")


# PNG colour types by (dtype, channels): grey, RGB, RGBA (8-bit) and 16-bit grey.
_PNG_COLOUR = {("u1", 1): (8, 0), ("u1", 3): (8, 2), ("u1", 4): (8, 6), ("u2", 1): (16, 0)}
PNG_COMPRESS_LEVEL = 1


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(array: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Deterministic PNG bytes of a uint8/uint16 grey or uint8 RGB(A) array.

    Every row uses PNG's "Up" filter (difference to the row above, vectorised in numpy) and the
    rows are deflated by zlib with its run-length strategy (``Z_RLE``; the Up filter turns smooth
    and background areas into runs of zeros) at ``compress_level``. On SynthRAD slices
    (``benchmarks/build_throughput.py --png`` prints the table) this is 4-8x faster than Pillow's
    adaptive per-row filtering at level 6, with files 0-5% larger on realistic-size slices (up to
    ~18% on the small upsampled demo slices). Any PNG reader decodes it (plain, non-interlaced).
    """
    arr = np.ascontiguousarray(array)
    channels = 1 if arr.ndim == 2 else (arr.shape[2] if arr.ndim == 3 else 0)
    kind = _PNG_COLOUR.get((arr.dtype.str.lstrip("<>|="), channels)) if arr.dtype.kind == "u" else None
    if kind is None or arr.ndim not in (2, 3) or 0 in arr.shape[:2]:
        raise SchemaError("image", f"cannot encode array of dtype {arr.dtype} and shape {arr.shape} as PNG")
    depth, colour = kind
    h, w = arr.shape[:2]
    rows = (arr.astype(">u2") if depth == 16 else arr).view(np.uint8).reshape(h, -1)
    filtered = np.empty((h, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type "Up"; on the first row it is the identity
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as the filter defines
    header = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    deflate = zlib.compressobj(compress_level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", deflate.compress(filtered.tobytes()) + deflate.flush())
            + _png_chunk(b"IEND", b""))


def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class Sample:
    """One example: key, record and image members.

    ``input_image`` is either upstream bytes (JPEG/PNG, kept verbatim) or an array (written as PNG).
    ``target`` is the 256x256 uint8 generation target; ``target_vq`` its 1024 VQ indices (filled in
    by the build runner when a VQ tokenizer is configured). ``extras`` holds further members such as
    ``reference.png`` (the 16-bit target slice) and ``mask.png`` (the body mask) of SynthRAD samples.
    """

    key: str
    record: Record
    input_image: bytes | np.ndarray | None = None
    target: np.ndarray | None = None
    target_vq: np.ndarray | None = None
    extras: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not KEY_RE.match(self.key):
            raise SchemaError("key", f"{self.key!r} must use only [A-Za-z0-9_-]")
        rec = self.record
        n_img = rec.n_images
        if self.input_image is None and n_img:
            raise SchemaError("conversations", f"{n_img} {IMAGE_TOKEN} token(s) but no input image", self.key)
        if self.input_image is not None and n_img != 1:
            raise SchemaError("conversations", f"an image sample needs exactly one {IMAGE_TOKEN}, found {n_img}", self.key)
        if isinstance(self.input_image, bytes):
            image_format(self.input_image)
        if rec.task == "generation":
            if self.target is None and self.target_vq is None:
                raise SchemaError("target", "a generation sample needs a target image or its VQ indices", self.key)
        elif self.target is not None or self.target_vq is not None:
            raise SchemaError("target", "comprehension samples carry no generation target", self.key)
        if self.target is not None:
            t = self.target
            if t.dtype != np.uint8 or t.shape[:2] != (TARGET_SIZE, TARGET_SIZE) or t.ndim not in (2, 3):
                raise SchemaError("target", f"must be uint8 {TARGET_SIZE}x{TARGET_SIZE}, got {t.dtype} {t.shape}", self.key)
        if self.target_vq is not None:
            self.target_vq = check_vq(self.target_vq, self.key)
        for name in self.extras:
            if name in STANDARD_MEMBERS or not EXTRA_MEMBER_RE.match(name):
                raise SchemaError("extras", f"bad member name {name!r}", self.key)

    @property
    def input_format(self) -> str | None:
        if self.input_image is None:
            return None
        return image_format(self.input_image) if isinstance(self.input_image, bytes) else "png"

    def to_members(self) -> dict[str, bytes]:
        """Member suffix -> bytes, as written into the tar under ``<key>.<suffix>``."""
        members: dict[str, bytes] = {"json": _record_json(self.record)}
        if self.input_image is not None:
            data = self.input_image if isinstance(self.input_image, bytes) else encode_png(self.input_image)
            members[f"input.{self.input_format}"] = data
        if self.target is not None:
            members["target.png"] = encode_png(self.target)
        if self.target_vq is not None:
            members["target.vq.npy"] = npy_bytes(self.target_vq)
        members.update(self.extras)
        return members

    @classmethod
    def from_members(cls, key: str, members: dict[str, bytes]) -> Sample:
        if "json" not in members:
            raise SchemaError("json", "sample has no json member", key)
        try:
            data = json.loads(members["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SchemaError("json", f"not valid JSON: {exc}", key) from exc
        record = Record.from_json(data)
        input_image = members.get("input.png", members.get("input.jpg"))
        target = decode_image(members["target.png"]) if "target.png" in members else None
        vq = load_npy(members["target.vq.npy"]) if "target.vq.npy" in members else None
        extras = {k: v for k, v in members.items() if k not in STANDARD_MEMBERS}
        return cls(key=key, record=record, input_image=input_image, target=target, target_vq=vq, extras=extras)


def _record_json(record: Record) -> bytes:
    """The ``json`` member: ``record.to_json()`` serialised, without ``asdict``'s deep copy."""
    shallow = {f.name: getattr(record, f.name) for f in fields(record)}
    try:
        text = json.dumps(shallow, sort_keys=True, ensure_ascii=False)
    except TypeError:  # a nested dataclass in provenance/extra: let asdict convert it
        text = json.dumps(record.to_json(), sort_keys=True, ensure_ascii=False)
    return text.encode("utf-8")


IMAGE_POSITIONS = ("first", "last")


def image_turn(instruction: str, position: str = "first") -> str:
    """A human turn with the image placeholder before (``first``, LLaVA's form) or after (``last``) the text."""
    if position not in IMAGE_POSITIONS:
        raise ValueError(f"image position must be one of {IMAGE_POSITIONS}, got {position!r}")
    return f"{IMAGE_TOKEN}\n{instruction}" if position == "first" else f"{instruction}\n{IMAGE_TOKEN}"


def check_vq(indices: np.ndarray, key: str | None = None) -> np.ndarray:
    arr = np.asarray(indices)
    side = math.isqrt(arr.size) if arr.ndim == 1 else 0
    if arr.ndim != 1 or not 1 <= arr.size <= VQ_LENGTH or side * side != arr.size:
        raise SchemaError("target.vq.npy", f"must hold a flat square grid of at most {VQ_LENGTH} indices "
                          f"(32x32; a smaller VQ grid such as the demo's 16x16 is allowed), got shape {arr.shape}", key)
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= VQ_CODEBOOK:
        raise SchemaError("target.vq.npy", f"indices must be integers in [0, {VQ_CODEBOOK})", key)
    return arr.astype(np.int16)
