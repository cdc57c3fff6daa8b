"""Bad inputs in the sources' own layouts, one helper per builder (not a pytest plugin: import explicitly).

Each helper takes a copy of a demo source root and ADDS bad rows/files to it (the good ones stay as they
are), returning ``{marker: (file, reason regex)}``: the reject each bad input must produce. A build of the
result must therefore hold exactly the samples of a build of the clean copy.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import numpy as np

from vlhealth.demo._io import jpeg_bytes

DEEP = 10_000


def palette_png_bomb(path: Path, side: int = 13_000) -> int:
    """A ``side`` x ``side`` 8-bit palette PNG of zeros (164 KB at 13000 px), written without ever holding
    the pixels: the IDAT stream is compressed row by row. Returns the file size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + one palette index per pixel
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", bytes(3 * 4)) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


def deep_list(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def _chat_row(row_id: str, image: str | list[str], human: object, gpt: object) -> dict:
    return {"id": row_id, "image": image, "conversations": [{"from": "human", "value": human},
                                                             {"from": "gpt", "value": gpt}]}


def _append_rows(path: Path, rows: list[str]) -> None:
    """Append raw JSON texts to the list in ``path`` (kept as text: some are not valid Python-made JSON)."""
    text = path.read_text("utf-8").rstrip()
    assert text.endswith("]")
    path.write_text(text[:-1].rstrip() + ",\n" + ",\n".join(rows) + "\n]\n", encoding="utf-8")


def corrupt_pubmedvision(root: Path, outside: Path) -> dict[str, tuple[str, str]]:
    """PubMedVision layout: every bad input of issue 12 as extra rows/files of the instruction file."""
    name = "PubMedVision_InstructionTuning_VQA.json"
    palette_png_bomb(root / "images" / "bomb.png")
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.jpg").write_bytes(jpeg_bytes(np.full((32, 32), 200, np.uint8)))
    (root / "images" / "linked.jpg").symlink_to(outside / "secret.jpg")
    (root / "images" / "fake.jpg").write_bytes(b"this is not an image, whatever its name says")
    good_image = "images/" + sorted(p.name for p in (root / "images").glob("pmc_*.jpg"))[0]
    q = "<image>\nWhat is shown?"
    rows = [
        json.dumps(_chat_row("bomb", ["images/bomb.png"], q, "A bomb.")),
        json.dumps(_chat_row("linked", ["images/linked.jpg"], q, "Outside.")),
        json.dumps(_chat_row("fake", ["images/fake.jpg"], q, "Nothing.")),
        json.dumps(_chat_row("dict_answer", [good_image], q, {"a": 1})),
        json.dumps(_chat_row("list_answer", [good_image], q, ["yes", "no"])),
        json.dumps(_chat_row("huge_question", [good_image], "x" * 1_000_000, "Long.")),
        json.dumps({"id": "no_question", "image": [good_image], "conversations": [{"from": "gpt", "value": "An answer."}]}),
        '{"id": "deep", "image": ["' + good_image + '"], "conversations": ' + deep_list() + "}",
    ]
    _append_rows(root / name, rows)
    return {
        "bomb": ("images/bomb.png", r"^image too large: 13000x13000 = 169,000,000 pixels \(limit 50,000,000"),
        "linked": ("images/linked.jpg", r"^outside the source root"),
        "fake": ("images/fake.jpg", r"^unreadable image: not a recognised image format$"),
        "dict_answer": (name, r"^bad row: row \d+: turn 1 \(gpt\) is a JSON object, expected a string or a number$"),
        "list_answer": (name, r"^bad row: row \d+: turn 1 \(gpt\) is a JSON list, expected a string or a number$"),
        "huge_question": (name, r"^text too long: row \d+: turn 0 \(human\) has 1,000,000 characters \(limit 16,384"),
        "no_question": (name, r"^bad row: row \d+: conversation has no question \(no human turn\)$"),
        "deep": (name, r"^bad row: row \d+ is nested deeper than 64 levels$"),
    }


def corrupt_pubmedvision_encoding(root: Path) -> dict[str, tuple[str, str]]:
    """A byte that is no UTF-8 in the last row of the alignment file: the rows before it are kept."""
    name = "PubMedVision_Alignment_VQA.json"
    text = (root / name).read_text("utf-8").rstrip()
    raw = text[:-1].rstrip().encode() + b',\n{"id": "latin1", "image": [], "conversations": "caf\xe9"}\n]\n'
    (root / name).write_bytes(raw)
    return {"latin1": (name, r"^not UTF-8: byte 0xe9 at offset [\d,]+ does not decode; the file is refused from there "
                             r"\(rows 0-\d+ were read\)$")}


def corrupt_llava_med(root: Path) -> dict[str, tuple[str, str]]:
    """LLaVA-Med's JSON-lines form: a copy of the instruct file as .jsonl with bad lines appended."""
    rows = [r for r in json.loads((root / "llava_med_instruct_10k.json").read_text("utf-8"))
            if isinstance(r, dict) and (root / "images" / r["image"]).is_file() and r["id"] != "empty-answer"]
    name = "llava_med_instruct_extra.jsonl"
    good = [json.dumps({**r, "id": f"extra-{r['id']}"}) for r in rows]
    image = rows[0]["image"]
    bad = [
        b'{"id": "latin1", "image": "' + image.encode() + b'", "conversations": "caf\xe9"}',
        b'{"id": "broken", "image": ',
        ('{"id": "deep", "image": "' + image + '", "conversations": ' + deep_list() + "}").encode(),
        json.dumps(_chat_row("dict_turn", image, "<image>\nWhat?", {"answer": "x"})).encode(),
    ]
    (root / name).write_bytes(b"\n".join([g.encode() for g in good] + bad) + b"\n")
    first_bad = len(good) + 1
    return {
        "latin1": (name, rf"^bad row: line {first_bad} is not UTF-8 \(byte 0xe9 at column \d+\)$"),
        "broken": (name, rf"^bad row: line {first_bad + 1} is not valid JSON \("),
        "deep": (name, rf"^bad row: line {first_bad + 2} is nested deeper than 64 levels$"),
        "dict_turn": (name, rf"^bad row: row {first_bad + 3}: turn 1 \(gpt\) is a JSON object"),
    }


def corrupt_vqa_rad(root: Path) -> dict[str, tuple[str, str]]:
    """VQA-RAD's list of QA rows: answers that are a JSON object or list, a 1 MB question."""
    name = "VQA_RAD Dataset Public.json"
    rows = json.loads((root / name).read_text("utf-8"))
    base = rows[0]
    extra = [{**base, "qid": "dict_answer", "answer": {"a": 1}},
             {**base, "qid": "list_answer", "answer": ["yes", "no"], "answer_type": "CLOSED"},
             {**base, "qid": "huge_question", "question": "Why? " * 200_000}]
    _append_rows(root / name, [json.dumps(r) for r in extra])
    n = len(rows)
    return {
        "dict_answer": (name, rf"^bad row: row {n}: answer is a JSON object, expected a string or a number$"),
        "list_answer": (name, rf"^bad row: row {n + 1}: answer is a JSON list, expected a string or a number$"),
        "huge_question": (name, r"^text too long: huge_question question has [\d,]+ characters \(limit 16,384"),
    }


def corrupt_synthrad(root: Path) -> dict[str, tuple[str, str]]:
    """SynthRAD layout: one more brain patient whose CT header stores a negative pixdim."""
    task = root / "Task1" if (root / "Task1").is_dir() else root
    patients = sorted(p for p in (task / "brain").iterdir() if p.is_dir())
    src, dst = patients[0], task / "brain" / "1BZ999"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    ct = next(dst.glob("ct.nii*"))
    raw = bytearray(gzip.decompress(ct.read_bytes()) if ct.name.endswith(".gz") else ct.read_bytes())
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    raw[80:84] = struct.pack(endian + "f", -1.0)  # pixdim[1]
    ct.write_bytes(gzip.compress(bytes(raw), mtime=0) if ct.name.endswith(".gz") else bytes(raw))
    rel = ct.relative_to(root).as_posix()
    return {"negative_pixdim": (rel, r"voxel spacing \(pixdim\) must be positive, got \[-1\.0, ")}
