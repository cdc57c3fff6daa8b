"""What a single untrusted input may cost, checked in one place before anything is decoded.

Upstream sources are downloaded from the internet; a build must refuse, with a clear reason, what
would blow up memory or slip foreign bytes into the shards:

* **files**: symlinks are resolved and a file whose link lands outside the source root is refused
  ("outside the source root"; folders linked into the root, e.g. data on another disk, are part of
  the layout); a file larger than ``max_file_bytes`` is refused unread.
* **images**: the pixel count is read from the header (Pillow's lazy open, no decode) and an image
  above ``max_image_pixels`` is refused before decoding; Pillow's decompression-bomb warning is
  turned into a refusal too (a 164 KB palette PNG can decode to 13000x13000 pixels).
* **text**: a question, answer or conversation turn must be a string or a number (a JSON list or
  object is refused with its type), at most ``max_text_chars`` characters, and annotation files
  must be UTF-8 (:mod:`vlhealth.jsonstream` decodes strictly).
* **JSON**: rows nested deeper than ``max_json_depth`` are refused.

Reasons are deterministic: :func:`plain_reason` removes the memory addresses that some library
messages carry (``<_io.BytesIO object at 0x7f...>``) so identical runs write identical
``rejects.jsonl`` files.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LimitError(ValueError):
    """An input over a limit, or one that may not be read; ``str()`` is ``"<category>: <detail>"``."""


@dataclass(frozen=True)
class Limits:
    """Per-input limits of a build (``vlhealth build ... --max-image-pixels/--max-file-bytes/--max-text-chars``)."""

    max_image_pixels: int = 50_000_000  # 50 MP: ~7000x7000, above any figure or radiograph of the sources
    max_file_bytes: int = 4 * 1024**3  # annotation JSON of 665k/1.3M rows is ~1 GB; volumes and images far less
    max_text_chars: int = 16_384  # a question, answer or turn; the models' contexts hold 2-4k tokens
    max_json_depth: int = 64  # an annotation row nests 4-5 levels

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if int(getattr(self, f.name)) < 1:
                raise ValueError(f"{f.name.replace('_', '-')} must be a positive number, got {getattr(self, f.name)}")

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_ADDRESS = re.compile(r"<([A-Za-z_][\w.]*)(?: object)? at 0x[0-9a-fA-F]+>")


def plain_reason(text: str) -> str:
    """``text`` without memory addresses: ``<_io.BytesIO object at 0x7f..>`` -> ``<_io.BytesIO>``."""
    return _ADDRESS.sub(r"<\1>", text)


# -- files ----------------------------------------------------------------------------------------
def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def resolve_inside(path: os.PathLike | str, root: os.PathLike | str) -> Path:
    """The real path of ``path`` (symlinks resolved). A file that is itself a symlink must land inside the
    source root, or inside its own folder; otherwise it is refused as "outside the source root". Folders
    linked into the root (data kept on another disk) are part of the layout: the files in them are
    checked against the linked folder."""
    p = Path(path)
    real = p.resolve()
    if _inside(real, Path(root).resolve()) or not p.is_symlink() or _inside(real, p.parent.resolve()):
        return real
    raise LimitError("outside the source root: the file is a symlink to a path outside the source root")


def checked_file(path: os.PathLike | str, root: os.PathLike | str | None, limits: Limits) -> Path:
    """The real path of a file to read whole: inside ``root`` (when given) and at most ``max_file_bytes``."""
    real = resolve_inside(path, root) if root is not None else Path(path)
    size = real.stat().st_size
    if size > limits.max_file_bytes:
        raise LimitError(f"file too large: {size:,} bytes (limit {limits.max_file_bytes:,}; --max-file-bytes)")
    return real


# -- images ---------------------------------------------------------------------------------------
def open_image_checked(data: bytes, limits: Limits) -> Any:
    """A lazily opened ``PIL.Image`` of ``data`` whose size was checked against ``max_image_pixels``
    from the header, before any pixel is decoded. Raises :class:`LimitError` (too many pixels) or
    ``OSError`` (not an image)."""
    from PIL import Image, UnidentifiedImageError

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # Pillow's own check at open would only warn below 2x its limit: ours follows
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        # Pillow's message holds the BytesIO's memory address: say it without one
        raise OSError("not a recognised image format") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    width, height = img.size
    if width * height > limits.max_image_pixels:
        img.close()
        raise LimitError(f"image too large: {width}x{height} = {width * height:,} pixels "
                         f"(limit {limits.max_image_pixels:,}; --max-image-pixels)")
    return img


def decode_limited(img: Any, limits: Limits) -> None:
    """``img.load()`` with Pillow's own bomb check set to our limit (frames of an animation, a crafted
    header that lies about its size, ...)."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise LimitError(f"image too large: {plain_reason(str(exc))}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def read_image_file(path: os.PathLike | str, root: os.PathLike | str | None, limits: Limits) -> tuple[bytes, Any]:
    """``(file bytes, decoded PIL image)`` of an image file, every check above applied in order: inside the
    root, file size, pixel count from the header, then the decode. The caller closes the image."""
    data = checked_file(path, root, limits).read_bytes()
    if not data:
        raise OSError("empty file")
    img = open_image_checked(data, limits)
    try:
        decode_limited(img, limits)
    except BaseException:
        img.close()
        raise
    return data, img


# -- text -----------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return {dict: "a JSON object", list: "a JSON list", tuple: "a JSON list"}.get(type(value), type(value).__name__)


def check_text_value(value: Any, what: str, limits: Limits | None = None, *, allow_list: bool = False) -> Any:
    """``value`` if it may become text: a string or a number (a list of those when ``allow_list``, e.g.
    MIMIC-CXR-VQA's list answers), within ``limits.max_text_chars`` when ``limits`` is given; otherwise
    ``ValueError("<category>: ...")`` naming ``what`` and the type."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        if limits is not None and len(value) > limits.max_text_chars:
            raise ValueError(f"text too long: {what} has {len(value):,} characters "
                             f"(limit {limits.max_text_chars:,}; --max-text-chars)")
        return value
    if allow_list and isinstance(value, list) and all(v is None or isinstance(v, str | int | float) for v in value):
        for v in value:
            check_text_value(v, what, limits)
        return value
    raise ValueError(f"bad row: {what} is {_type_name(value)}, expected a string or a number")


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests deeper than ``limit`` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False
