"""Shared logic of the comprehension builders (VQA and instruction datasets).

Every comprehension builder in ``builders/`` reads its upstream rows, turns each into a
:class:`QA` (one question/answer) or :class:`Chat` (a LLaVA conversation), and hands it to
:func:`emit` together with the image path. Everything the builders have in common lives here once:

* **question forms** (``--forms``): closed yes/no questions are emitted open-ended
  (``answer_type: closed``), as a single choice with the options listed in the instruction
  (``answer_type: choice``, the answer is the option's text), or both (the choice variant's key
  gets a ``-choice`` suffix). Upstream multiple-choice items (OmniMedVQA) are always choice.
* **answer normalisation**: numbers (``2``, ``2.0``) become ``"2"``, yes/no is lower-cased,
  whitespace is collapsed; lists (MIMIC-CXR-VQA) are joined with ``", "``.
* **images**: paths are resolved inside the source root (no escaping it), missing and
  unreadable files are refused with the reason, JPEG and PNG bytes are kept verbatim, other
  formats (GIF, BMP, TIFF, WebP) are re-encoded as PNG. Each image is decoded once per item and
  its perceptual hashes (``extra.phash``/``extra.dhash``) are stored with every sample so that
  ``vlhealth check-leaks`` never needs to decode it again.
* **leak guard at build time** (``--drop-leaks SHARDS``): train/val images that near-duplicate a
  test image of the given shard folders are refused with reason ``leak``. Against a source's own
  test split (VQA-RAD asks test questions about training images), build it once, then rebuild
  into another folder with ``--drop-leaks`` pointing at the first build.
* **modality and body-part names** are made canonical by the build runner (:mod:`vlhealth.vocab`;
  the upstream spelling stays in ``provenance.modality_upstream`` / ``body_part_upstream``).
* **limits** (:mod:`vlhealth.limits`): questions, answers and turns must be strings or numbers of at
  most ``--max-text-chars``; images above ``--max-image-pixels`` or files above ``--max-file-bytes``
  are refused before decoding; symlinks leaving the source root are refused.
* **conversations**: roles ``user``/``assistant`` map to ``human``/``gpt``; the misspelt
  ``conversatons`` key is accepted; ``<image>`` is added to the first human turn where missing.
* **pickles** (PathVQA) are opened with :func:`load_pickle`, a restricted unpickler that admits
  only plain builtin containers and scalars.

Keys are ``<source>-<upstream id>``; the group of a sample is its image id so that splits and leak
checks work per image.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from vlhealth.build import BuildContext, Reject, Rejected
from vlhealth.itemstore import HashedKeySet
from vlhealth.jsonstream import iter_json_rows
from vlhealth.limits import (
    LimitError,
    Limits,
    check_text_value,
    checked_file,
    plain_reason,
    read_image_file,
)
from vlhealth.schema import IMAGE_TOKEN, TARGET_IMAGE_TOKEN, Record, Sample, safe_key
from vlhealth.vocab import canonical_modality  # noqa: F401 - re-exported: its home was here

FORMS = ("open", "choice", "both")
YES_NO = ("yes", "no")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_CHOICE_SUFFIX = "Answer with the text of the correct option."
ROLE_MAP = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "model": "gpt"}


# -- options shared by every comprehension builder ------------------------------------------------
@dataclass
class VQAOptions:
    """Options every comprehension builder has (builders subclass this dataclass)."""

    forms: str = field(default="open", metadata={
        "help": "Closed yes/no questions as 'open' (answer_type closed), 'choice' (yes/no listed as options) or 'both'."})
    image_format: str = field(default="keep", metadata={
        "help": "'keep' (JPEG/PNG bytes verbatim, others -> PNG) or 'jpg'/'png' to re-encode the others so "
                "that every sample of the folder has the same members (JPEG quality 95)."})
    drop_leaks: list[str] = field(default_factory=list, metadata={
        "path": True,
        "help": "Test shard folders/tars (repeatable): train/val images that near-duplicate one of their test "
                "images are refused with reason 'leak'."})

    def __post_init__(self) -> None:
        # build.json records the options: keep the building machine's absolute paths out of it. Every
        # option whose field metadata says ``"path": True`` (here and in builders' subclasses) is made
        # relative to the working directory, which the build (and its worker processes) runs in.
        for f in dataclasses.fields(self):
            if not f.metadata.get("path"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, [relative_path(v) for v in value])
            elif isinstance(value, str | os.PathLike) and str(value):
                setattr(self, f.name, relative_path(value))


def relative_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it is absolute (as given otherwise)."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        return text
    try:
        return os.path.relpath(text)
    except ValueError:  # another drive (Windows): keep as given
        return text


def check_forms(forms: str) -> str:
    if forms not in FORMS:
        raise ValueError(f"--forms must be one of {', '.join(FORMS)}, got {forms!r}")
    return forms


# -- text normalisation ---------------------------------------------------------------------------
def normalise_text(value: Any) -> str:
    """A question/answer value as clean text: numbers without a spurious ``.0``, whitespace collapsed."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list | tuple):
        return ", ".join(t for t in (normalise_text(v) for v in value) if t)
    text = re.sub(r"\s+", " ", str(value)).strip()
    if re.fullmatch(r"-?\d+\.0+", text):  # "2.0" -> "2" (VQA-RAD stores some numbers as floats)
        text = text.split(".")[0]
    return text


def clean_upstream_answer(value: Any) -> str:
    """Build-time cleaning of an upstream answer as it goes into a shard: whitespace collapsed,
    "2.0" -> "2", yes/no lower-cased; the answer otherwise keeps its words. (Scoring has its own,
    much stronger normaliser, ``healthgpt.evaluation.answer_metrics.normalize_for_scoring``.)"""
    text = normalise_text(value)
    if text.lower() in YES_NO:
        return text.lower()
    return text


def is_yes_no(answer: str) -> bool:
    return answer.strip().lower() in YES_NO


def choice_instruction(question: str, options: list[str], suffix: str = DEFAULT_CHOICE_SUFFIX) -> str:
    """The single-choice instruction: the question, the lettered options, what to answer."""
    if len(options) > len(LETTERS):
        raise ValueError(f"too many options ({len(options)})")
    lines = [question.strip(), "Options:"]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    lines.append(suffix)
    return "\n".join(lines)


def text_value(value: Any, what: str, *, allow_list: bool = False) -> str:
    """:func:`normalise_text` of a question/answer value that must be a string or a number (a list of
    those with ``allow_list``); anything else (a JSON object, a list) is refused with its type."""
    return normalise_text(check_text_value(value, what, allow_list=allow_list))


# -- the units builders hand over ----------------------------------------------------------------
@dataclass
class QA:
    """One upstream question/answer about one image.

    ``answer_type`` is ``open`` or ``closed`` (upstream label; yes/no answers count as closed), or
    ``choice`` with ``options`` (the answer must be one of them).
    """

    id: str
    question: str
    answer: str
    answer_type: str
    split: str
    options: list[str] | None = None
    modality: str | None = None
    body_part: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    subtask: str = "vqa"


@dataclass
class Chat:
    """One LLaVA-style conversation (already checked by :func:`normalise_conversation`)."""

    id: str
    conversations: list[dict[str, str]]
    split: str
    subtask: str = "conversation"
    modality: str | None = None
    body_part: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# -- conversations -------------------------------------------------------------------------------
def conversation_of(row: dict[str, Any]) -> Any:
    """The turns of a LLaVA row; accepts LLaVA-Med's misspelt ``conversatons``."""
    if "conversations" in row:
        return row["conversations"]
    return row.get("conversatons")


def normalise_conversation(turns: Any, *, has_image: bool, limits: Limits | None = None) -> list[dict[str, str]]:
    """Clean LLaVA turns or raise ``ValueError("<category>: <detail>")``.

    Roles are mapped to human/gpt, values stripped; a leading gpt turn is skipped (as LLaVA does), a
    trailing human turn dropped; the rest must alternate starting with the human; ``<image>`` appears
    exactly once (added to the first human turn where missing) for image records and never for
    text-only ones.
    """
    if not isinstance(turns, list) or not turns:
        raise ValueError("bad row: no conversations list")
    out: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "value" not in turn or "from" not in turn:
            raise ValueError(f"bad row: turn {i} is not a {{from, value}} object")
        role = ROLE_MAP.get(str(turn["from"]).strip().lower())
        if role is None:
            raise ValueError(f"bad row: turn {i} has unknown role {turn['from']!r}")
        raw = check_text_value(turn["value"], f"turn {i} ({role})", limits)
        value = normalise_text(raw) if not isinstance(raw, str) else raw.strip()
        if not value:
            raise ValueError(f"empty answer: turn {i} is empty" if role == "gpt" else f"bad row: turn {i} is empty")
        if TARGET_IMAGE_TOKEN in value:
            raise ValueError(f"bad row: turn {i} holds {TARGET_IMAGE_TOKEN}")
        out.append({"from": role, "value": value})
    if out[0]["from"] == "gpt" and IMAGE_TOKEN not in out[0]["value"]:
        out = out[1:]  # as LLaVA's preprocessing: skip a leading non-human turn (ShareGPT rows of 665k)
    if not any(t["from"] == "human" for t in out):
        raise ValueError("bad row: conversation has no question (no human turn)")
    if out[-1]["from"] == "human":  # a dangling question has no answer to learn from
        out = out[:-1]
    if not out:
        raise ValueError("empty answer: conversation has no gpt turn")
    for i, turn in enumerate(out):
        if turn["from"] != ("human", "gpt")[i % 2]:
            raise ValueError(f"bad row: turn {i} breaks the human/gpt alternation")
    n_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in out)
    if any(IMAGE_TOKEN in t["value"] for t in out if t["from"] == "gpt"):
        raise ValueError(f"bad row: {IMAGE_TOKEN} in a gpt turn")
    if has_image:
        if n_tokens == 0:
            out[0]["value"] = f"{IMAGE_TOKEN}\n{out[0]['value']}"
        elif n_tokens > 1:
            raise ValueError(f"multi-image: {n_tokens} {IMAGE_TOKEN} tokens")
    elif n_tokens:
        raise ValueError(f"bad row: text-only record with {IMAGE_TOKEN}")
    return out


def image_list(value: Any) -> list[str]:
    """The image field as a list of paths (``None``/missing -> [], a string -> [it])."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(f"bad row: image field {value!r} is neither a path nor a list of paths")


# -- files ---------------------------------------------------------------------------------------
class RestrictedUnpickler(pickle.Unpickler):
    """Admits only plain builtin types; anything else (code, classes, numpy) is refused."""

    # Data types only: range/slice are no data and would let a pickle build huge lists (list(range(N))).
    SAFE = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int",
                      "float", "complex", "bool"})

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in self.SAFE:
            import builtins

            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed (only builtin containers and scalars)")


def load_pickle(path: Path, rel: str, root: Path | None = None, limits: Limits | None = None) -> Any:
    """Unpickle an upstream file with :class:`RestrictedUnpickler` (Python 2 pickles via latin-1); a file
    outside ``root`` (through a symlink) or above ``limits.max_file_bytes`` is refused unread."""
    try:
        data = checked_file(path, root, limits or Limits()).read_bytes()
    except LimitError as exc:
        raise Rejected(rel, str(exc)) from exc
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise Rejected(rel, f"unsafe pickle: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - truncated or not a pickle at all
        raise Rejected(rel, f"bad pickle: {type(exc).__name__}: {exc}") from exc


def safe_relpath(rel: str) -> str:
    """A normalised POSIX path inside the source root; refuses absolute paths and ``..``."""
    rel = rel.replace("\\", "/").strip()
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or re.match(r"^[A-Za-z]:", rel) or ".." in p.parts:
        raise Rejected(rel or "<empty>", "unsafe path: image path must stay inside the source root")
    return p.as_posix()


@dataclass
class LoadedImage:
    data: bytes  # JPEG/PNG bytes as written into the shard
    grey: np.ndarray  # decoded luminance, for hashing
    width: int
    height: int
    converted_from: str | None = None


def load_image(path: Path, rel: str, root: Path | None = None, limits: Limits | None = None) -> LoadedImage:
    """Read, fully decode and check one image; JPEG/PNG bytes kept verbatim, others -> PNG.

    Before anything is decoded: the file must resolve (symlinks followed) inside ``root`` and be at most
    ``limits.max_file_bytes``; the pixel count read from the header must be at most
    ``limits.max_image_pixels`` (:mod:`vlhealth.limits`)."""
    limits = limits or Limits()
    if not path.is_file():
        raise Rejected(rel, "missing image")
    try:
        data, opened = read_image_file(path, root, limits)  # full decode: truncated files fail here, not in training
        with opened as img:
            fmt = (img.format or "").upper()
            width, height = img.size
            rgb_or_l = img.convert("RGB") if img.mode not in ("L", "RGB") else img.copy()
    except LimitError as exc:
        raise Rejected(rel, str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise Rejected(rel, f"unreadable image: {plain_reason(str(exc))}") from exc
    if min(width, height) < 2:
        raise Rejected(rel, f"unreadable image: degenerate size {width}x{height}")
    grey = np.asarray(rgb_or_l.convert("L"))
    converted = None
    if not ((fmt == "JPEG" and data[:3] == b"\xff\xd8\xff") or (fmt == "PNG" and data[:8] == b"\x89PNG\r\n\x1a\n")):
        from vlhealth.schema import encode_png

        converted = fmt.lower() or "unknown"
        data = encode_png(np.asarray(rgb_or_l))
    return LoadedImage(data, grey, width, height, converted)


IMAGE_FORMATS = ("keep", "jpg", "png")


def convert_format(image: LoadedImage, target: str) -> LoadedImage:
    """Re-encode an image whose format differs from ``target`` (``keep`` leaves it as it is)."""
    if target not in IMAGE_FORMATS:
        raise ValueError(f"--image-format must be one of {', '.join(IMAGE_FORMATS)}, got {target!r}")
    fmt = "jpg" if image.data[:3] == b"\xff\xd8\xff" else "png"
    if target in ("keep", fmt):
        return image
    from PIL import Image

    with Image.open(io.BytesIO(image.data)) as img:
        arr = np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
    if target == "png":
        from vlhealth.schema import encode_png

        data = encode_png(arr)
    else:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95, optimize=False, progressive=False)
        data = buf.getvalue()
    return LoadedImage(data, image.grey, image.width, image.height, image.converted_from or fmt)


# -- emitting samples ------------------------------------------------------------------------------
def _leak_index(ctx: BuildContext) -> Any:
    paths = tuple(getattr(ctx.options, "drop_leaks", None) or ())
    if not paths:
        return None
    from vlhealth.leaks import load_leak_index

    return load_leak_index(paths)


def qa_conversations(qa: QA, form: str, choice_suffix: str) -> tuple[list[dict[str, str]], str, list[str] | None]:
    """(conversations, answer_type, options) of a QA in one form (``open`` or ``choice``)."""
    if form == "choice":
        options = qa.options if qa.answer_type == "choice" else ["yes", "no"]
        assert options is not None
        human = choice_instruction(qa.question, options, choice_suffix)
        answer = next(o for o in options if o.strip() == qa.answer.strip()) if qa.answer_type == "choice" else qa.answer
        return ([{"from": "human", "value": f"{IMAGE_TOKEN}\n{human}"}, {"from": "gpt", "value": answer}],
                "choice", list(options))
    return ([{"from": "human", "value": f"{IMAGE_TOKEN}\n{qa.question}"}, {"from": "gpt", "value": qa.answer}],
            qa.answer_type, None)


def forms_of(qa: QA, forms: str) -> list[str]:
    if qa.answer_type == "choice":
        return ["choice"]
    if qa.answer_type == "closed" and is_yes_no(qa.answer):
        return {"open": ["open"], "choice": ["choice"], "both": ["open", "choice"]}[forms]
    return ["open"]


def check_qa(qa: QA, file: str, limits: Limits | None = None) -> Reject | None:
    """A reject for a QA that cannot become a sample (no question, empty answer, text over
    ``limits.max_text_chars``, answer not an option)."""
    if not qa.question:
        return Reject(file, f"bad row: {qa.id} has no question", qa.id)
    if not qa.answer:
        return Reject(file, f"empty answer: {qa.id}", qa.id)
    for what, text in (("question", qa.question), ("answer", qa.answer), *(("option", o) for o in qa.options or ())):
        try:
            check_text_value(text, f"{qa.id} {what}", limits or Limits())
        except ValueError as exc:
            return Reject(file, str(exc), qa.id)
    if qa.answer_type == "choice":
        opts = [o.strip() for o in qa.options or []]
        if len(opts) < 2 or any(not o for o in opts):
            return Reject(file, f"bad row: {qa.id} has fewer than two non-empty options", qa.id)
        if qa.answer.strip() not in opts:
            return Reject(file, f"answer not in options: {qa.id} answer {qa.answer!r}", qa.id)
    return None


def emit(
    ctx: BuildContext,
    source: str,
    units: Iterable[QA | Chat],
    *,
    image: str | None,
    image_path: Path | None = None,
    group: str,
    file: str,
) -> Iterator[Sample | Reject]:
    """Samples of all QAs/chats of one image (or one text-only record).

    ``image`` is the image path relative to the source root (used in provenance and rejects),
    ``image_path`` where to read it (default ``ctx.root / image``), ``file`` the upstream
    annotation file for row-level rejects. A missing or unreadable image refuses the whole item.
    """
    loaded = None
    hashes: dict[str, str] = {}
    leak = None
    if image is not None:
        loaded = load_image(image_path if image_path is not None else ctx.root / image, image,
                            ctx.root if image_path is None else None, ctx.limits)
        from vlhealth.leaks import image_hashes

        loaded = convert_format(loaded, getattr(ctx.options, "image_format", "keep"))
        hashes = image_hashes(loaded.grey)
        index = _leak_index(ctx)
        if index is not None:
            leak = index.match_grey(loaded.grey, hashes)
    forms = check_forms(getattr(ctx.options, "forms", "open"))
    choice_suffix = DEFAULT_CHOICE_SUFFIX
    if "choice" in ctx.manifest.get("templates", {}):
        choice_suffix = ctx.manifest["templates"]["choice"][0]
    for unit in units:
        if leak is not None and unit.split != "test":
            yield Reject(image or file, f"leak: near-duplicate of test image {leak.key} ({leak.source}, "
                                        f"pHash distance {leak.distance}, similarity {leak.similarity:.3f})", unit.id)
            continue
        provenance = dict(unit.provenance)
        if image is not None:
            provenance.setdefault("image", image)
        if loaded is not None and loaded.converted_from:
            provenance["converted_from"] = loaded.converted_from
        extra = {**unit.extra, **hashes}
        base_key = safe_key(source, unit.id)
        if isinstance(unit, Chat):
            answer_type = "open"
            variants = [(base_key, unit.conversations, answer_type, None)]
        else:
            bad = check_qa(unit, file, ctx.limits)
            if bad is not None:
                yield bad
                continue
            variants = []
            for i, form in enumerate(forms_of(unit, forms)):
                conv, answer_type, options = qa_conversations(unit, form, choice_suffix)
                variants.append((base_key if i == 0 else f"{base_key}-choice", conv, answer_type, options))
        for key, conv, answer_type, options in variants:
            record = Record(
                task="comprehension", subtask=unit.subtask, source=source, split=unit.split,
                conversations=conv, group=group, license=ctx.license, answer_type=answer_type,
                options=options, modality=unit.modality or None, body_part=(unit.body_part or "").strip() or None,
                provenance=provenance, extra=extra,
            )
            yield Sample(key=key, record=record, input_image=loaded.data if loaded is not None else None)


def rows_to_reject(file: str, row: int, exc: Exception) -> Reject:
    """A row-level reject: ``<category>: row N: detail`` (category from a ``ValueError`` message)."""
    msg = str(exc)
    category, _, detail = msg.partition(": ")
    if not detail:
        category, detail = "bad row", msg
    return Reject(file, f"{category}: row {row}: {detail}", f"row {row}")


class KeyBook:
    """Unique key-safe ids, first come first served.

    ``claim(raw)`` returns ``safe_key(raw)``, or, when that is taken — the same upstream id again, or
    another id that only differs in characters a key cannot hold (``"a.b"`` / ``"a_b"``) — the first
    free ``<safe>-2``, ``<safe>-3``, ... Keys therefore never collide, and follow the file order.
    """

    def __init__(self) -> None:
        # Bounded memory for 1.3M-row files: taken keys as 64-bit digests, and the last suffix only
        # for the bases that needed one.
        self._taken = HashedKeySet()
        self._last: dict[str, int] = {}

    def claim(self, raw: str) -> str:
        base = safe_key(raw)
        key, n = base, self._last.get(base, 1)
        while key in self._taken:
            n += 1
            key = f"{base}-{n}"
        if n != 1:
            self._last[base] = n
        self._taken.add(key)
        return key


def group_id(image_rel: str) -> str:
    """The group (image id) of an image path: its path without the extension, key-safe."""
    stem = image_rel.rsplit(".", 1)[0] if "." in PurePosixPath(image_rel).name else image_rel
    return safe_key(stem)


def items_by_image(entries: Iterable[tuple[str, QA, str]], *, image_base: str = "") -> Iterator[Any]:
    """Work items of a VQA source, one per image: ``(image_rel, qa, annotation_file)`` in, ``Item`` /
    ``Reject`` out. Duplicate question ids are refused (``duplicate id``), the first one kept; an id that
    only differs from an earlier one in characters a key cannot hold gets a ``-2`` suffix (:class:`KeyBook`).

    ``image_base`` is prefixed to the image path when reading (for sources whose annotation paths are
    relative to a sub-folder); the group is the image id (its path without extension).
    """
    from vlhealth.build import Item

    by_image: dict[str, list[QA]] = {}
    files: dict[str, set[str]] = {}
    seen: set[str] = set()
    keys = KeyBook()
    for image_rel, qa, file in entries:
        try:
            image_rel = safe_relpath(image_rel)
        except Rejected as exc:
            yield Reject(file, f"{exc.reason}: {qa.id} has image {image_rel!r}", qa.id)
            continue
        if qa.id in seen:
            yield Reject(file, f"duplicate id: {qa.id} appears more than once", qa.id)
            continue
        seen.add(qa.id)
        claimed = keys.claim(qa.id)
        if claimed != safe_key(qa.id):  # another id sanitises to the same key: keep both, apart
            qa.id = claimed
        by_image.setdefault(image_rel, []).append(qa)
        files.setdefault(image_rel, set()).add(file)
    used: dict[str, str] = {}
    for image_rel in sorted(by_image):
        gid = group_id(image_rel)
        if gid in used and used[gid] != image_rel:  # two paths that differ only in unsafe characters
            import hashlib

            gid = f"{gid}-{hashlib.sha1(image_rel.encode()).hexdigest()[:8]}"
        used[gid] = image_rel
        path = f"{image_base}{image_rel}"
        yield Item(id=gid, group=gid, files=(path, *sorted(files[image_rel])),
                   data={"image": path, "qas": by_image[image_rel], "file": sorted(files[image_rel])[0]})


def process_image_item(item: Any, ctx: BuildContext, source: str, image_path: Path | None = None
                       ) -> Iterator[Sample | Reject]:
    """``process`` of a source whose items come from :func:`items_by_image`."""
    yield from emit(ctx, source, item.data["qas"], image=item.data["image"], image_path=image_path,
                    group=item.group, file=item.data["file"])


def parse_rows(ctx: BuildContext, rel: str, parse: Any) -> Iterator[Any]:
    """``parse(row, row_number)`` over the rows of the annotation file ``rel``.

    A ``ValueError("<category>: <detail>")`` from ``parse`` becomes a row reject; ``None`` results are
    skipped; a file that cannot be read at all becomes one reject for the file.
    """
    try:
        path = checked_file(ctx.root / rel, ctx.root, ctx.limits)
        for entry in iter_json_rows(path, rel, ctx.limits):
            if isinstance(entry, Reject):
                yield entry
                continue
            i, row = entry
            try:
                out = parse(row, i)
            except (ValueError, TypeError, KeyError) as exc:
                yield rows_to_reject(rel, i, exc if isinstance(exc, ValueError) else ValueError(f"bad row: {exc!r}"))
                continue
            if out is not None:
                yield out
    except LimitError as exc:
        yield Reject(rel, str(exc))
    except Rejected as exc:
        yield Reject(exc.file, exc.reason)
    except OSError as exc:
        yield Reject(rel, f"unreadable file: {exc.strerror or exc}")


def discover_annotated(ctx: BuildContext, annotations: Iterable[tuple[str, Any]]) -> Iterator[Any]:
    """``discover`` of a VQA source with JSON annotation files: ``(file, parse)`` pairs in (``parse(row, i)``
    returns ``(image_rel, QA)`` as for :func:`parse_rows`), row rejects as they come, then one ``Item`` per
    image (:func:`items_by_image`)."""
    entries = []
    for file, parse in annotations:
        for out in parse_rows(ctx, file, parse):
            if isinstance(out, Reject):
                yield out
            else:
                entries.append((*out, file))
    yield from items_by_image(entries)


TEXT_ONLY = ("include", "exclude", "only")


def discover_chats(
    ctx: BuildContext,
    file: str,
    *,
    tag: str,
    subtask: str,
    split: str = "train",
    image_dirs: tuple[str, ...] = ("",),
    text_only: str = "include",
    meta: Any = None,
) -> Iterator[Any]:
    """Work items of a LLaVA-style conversation file, one per record.

    ``tag`` prefixes the upstream id (``<tag>-<id>``; repeated ids, and ids that sanitise to a taken key,
    get ``-2``, ``-3`` in file order: :class:`KeyBook`);
    images are looked up under each of ``image_dirs`` (relative to the root) in turn. Records with
    more than one image are refused (``multi-image``); text-only records are kept, skipped or kept
    alone according to ``text_only``. ``meta(row) -> dict`` adds modality/body_part.
    """
    from vlhealth.build import Item

    if text_only not in TEXT_ONLY:
        raise ValueError(f"--text-only must be one of {', '.join(TEXT_ONLY)}, got {text_only!r}")
    keys = KeyBook()

    def parse(row: Any, i: int) -> Item | Reject | None:
        if not isinstance(row, dict):
            raise ValueError("bad row: not an object")
        # The key is claimed before any filter, so that the n-th record with an id gets the same key
        # whichever records --text-only, the multi-image rule or a bad conversation leave out.
        upstream = normalise_text(row.get("id", row.get("_id"))) or f"row{i}"
        uid = keys.claim(f"{tag}-{upstream}" if tag else upstream)
        images = image_list(row.get("image"))
        if len(images) > 1:
            return Reject(file, f"multi-image: row {i} has {len(images)} images (excluded, as in the paper)", f"row {i}")
        if (text_only == "exclude" and not images) or (text_only == "only" and images):
            return None
        conv = normalise_conversation(conversation_of(row), has_image=bool(images), limits=ctx.limits)
        image = None
        if images:
            rel = safe_relpath(images[0])
            candidates = [f"{d.rstrip('/')}/{rel}" if d else rel for d in image_dirs]
            image = next((c for c in candidates if (ctx.root / c).is_file()), candidates[0])
        extra = dict(meta(row)) if meta is not None else {}
        chat = Chat(id=uid, conversations=conv, split=split, subtask=subtask,
                    modality=extra.pop("modality", None), body_part=extra.pop("body_part", None),
                    provenance={"file": file, "id": upstream}, extra=extra)
        group = group_id(image) if image else safe_key(tag or "text", upstream)
        return Item(id=safe_key(uid), group=group, files=(image or file, file),
                    data={"chats": [chat], "image": image, "file": file})

    def guarded(row: Any, i: int) -> Any:
        try:
            return parse(row, i)
        except Rejected as exc:
            raise ValueError(f"{exc.reason}: {exc.file}") from exc

    yield from parse_rows(ctx, file, guarded)


def process_chat_item(item: Any, ctx: BuildContext, source: str) -> Iterator[Sample | Reject]:
    """``process`` of a source whose items come from :func:`discover_chats`."""
    yield from emit(ctx, source, item.data["chats"], image=item.data["image"], group=item.group,
                    file=item.data["file"])
