"""Demo data: deterministic, every upstream layout present and parseable, content consistent."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlhealth.demo import MODULES, registry, source_names, write_demo_data
from vlhealth.volumes import read_volume, same_geometry

ALL = ["synthrad2023", "ixi", "vqa_rad", "slake", "pathvqa",
       "mimic_cxr_vqa", "llava_med", "pubmedvision", "llava_instruct", "omnimedvqa", "mimic_cxr", "llava_pretrain"]


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    roots = write_demo_data(out)
    assert roots == {name: out / name for name in ALL}
    return out


class _BuiltinsOnly(pickle.Unpickler):
    """The restricted unpickler the builders are expected to use for PathVQA's pickles."""

    SAFE = {"list", "dict", "str", "int", "float", "bool", "tuple", "set", "frozenset"}

    def find_class(self, module: str, name: str) -> object:
        if module == "builtins" and name in self.SAFE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def test_registry_lists_every_layout() -> None:
    assert source_names() == ALL
    assert len(MODULES) == len(registry())
    for module in registry().values():
        assert callable(module.write)


def test_same_seed_gives_identical_bytes(demo: Path, tmp_path: Path) -> None:
    again = write_demo_data(tmp_path / "again")
    first = _hashes(demo)
    assert len(first) > 50
    assert _hashes(tmp_path / "again") == first
    # a rerun into the same folder replaces the copy completely (no stale files)
    (again["slake"] / "stale.txt").write_text("x")
    write_demo_data(tmp_path / "again", ["slake"])
    assert _hashes(tmp_path / "again") == first


def test_sources_are_independent_and_seed_matters(demo: Path, tmp_path: Path) -> None:
    only = write_demo_data(tmp_path / "only", ["pathvqa"])
    assert list(only) == ["pathvqa"]
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["pathvqa"]
    assert _hashes(only["pathvqa"]) == _hashes(demo / "pathvqa")
    other = write_demo_data(tmp_path / "seed1", ["pathvqa"], seed=1)
    assert _hashes(other["pathvqa"]) != _hashes(demo / "pathvqa")
    with pytest.raises(ValueError, match="unknown demo source"):
        write_demo_data(tmp_path / "bad", ["nope"])


def test_demo_is_small(demo: Path) -> None:
    total = sum(p.stat().st_size for p in demo.rglob("*") if p.is_file())
    assert total < 30 * 2**20


# ----------------------------------------------------------------------------------- SynthRAD2023


def test_synthrad_layout_and_volumes(demo: Path) -> None:
    root = demo / "synthrad2023"
    for anatomy, letter in (("brain", "B"), ("pelvis", "P")):
        patients = sorted(p.name for p in (root / "Task1" / anatomy).iterdir())
        assert len(patients) >= 3
        assert all(re.fullmatch(rf"1{letter}[ABC]\d{{3}}", p) for p in patients)
        for pid in patients:
            folder = root / "Task1" / anatomy / pid
            assert sorted(p.name for p in folder.iterdir()) == ["ct.nii.gz", "mask.nii.gz", "mr.nii.gz"]
            ct = read_volume(folder / "ct.nii.gz", root=root)
            mr = read_volume(folder / "mr.nii.gz", root=root)
            mask = read_volume(folder / "mask.nii.gz", root=root)
            assert ct.source == f"Task1/{anatomy}/{pid}/ct.nii.gz"
            assert ct.array.dtype == np.int16
            assert mr.array.dtype in (np.float32, np.uint16)
            assert mask.array.dtype == np.uint8 and set(np.unique(mask.array).tolist()) == {0, 1}
            assert np.allclose(ct.direction, np.eye(3))
            assert same_geometry(ct, mr) and same_geometry(ct, mask)
            assert ct.spacing[0] > ct.spacing[1]  # anisotropic: thicker slices
            hu = ct.array
            assert hu.min() >= -1024 and hu.max() > 700
            # one tissue -> intensity table per modality: bone bright in CT but dark in MR,
            # soft tissue mid-grey in both; air dark in both
            body = mask.array > 0
            bone = (hu > 700) & body
            soft = (hu > 20) & (hu < 60) & body
            air = hu < -900
            mr_v = mr.array.astype(np.float64)
            assert np.median(mr_v[bone]) < 0.5 * np.median(mr_v[soft])
            assert np.median(mr_v[air]) < 0.2 * np.median(mr_v[soft])


def test_synthrad_patients_differ(demo: Path) -> None:
    folder = demo / "synthrad2023" / "Task1" / "brain"
    a = read_volume(folder / "1BA001" / "mask.nii.gz")
    b = read_volume(folder / "1BA002" / "mask.nii.gz")
    assert a.shape != b.shape or not np.array_equal(a.array, b.array)


# -------------------------------------------------------------------------------------------- IXI


def test_ixi_layout_names_and_spreadsheet(demo: Path) -> None:
    root = demo / "ixi"
    pattern = re.compile(r"IXI\d{3}-(Guys|HH|IOP)-\d{4}-(T1|T2|PD)\.nii\.gz")
    sites = set()
    for modality in ("T1", "T2", "PD"):
        files = sorted((root / f"IXI-{modality}").iterdir())
        assert len(files) >= 3
        for f in files:
            m = pattern.fullmatch(f.name)
            assert m and m.group(2) == modality
            sites.add(m.group(1))
    assert sites == {"Guys", "HH", "IOP"}
    assert (root / "IXI-T1" / "IXI002-Guys-0828-T1.nii.gz").exists()
    # T2 and PD are one dual-echo acquisition: same geometry; T1 is stored sagittally
    t2 = read_volume(root / "IXI-T2" / "IXI002-Guys-0828-T2.nii.gz")
    pd = read_volume(root / "IXI-PD" / "IXI002-Guys-0828-PD.nii.gz")
    assert same_geometry(t2, pd)
    t1 = read_volume(root / "IXI-T1" / "IXI002-Guys-0828-T1.nii.gz")
    assert np.allclose(t1.direction, np.eye(3))
    assert t1.shape[0] > t1.shape[2]  # canonical (z, y, x) after reorienting the sagittal file

    xls, csv_path = root / "IXI.xls", root / "IXI.csv"
    if xls.exists():
        import xlrd

        sheet = xlrd.open_workbook(str(xls)).sheet_by_name("Table")
        header = [str(v) for v in sheet.row_values(0)]
        rows = [sheet.row_values(r) for r in range(1, sheet.nrows)]
    else:
        import csv

        with csv_path.open(encoding="utf-8") as fh:
            reader = list(csv.reader(fh))
        header, rows = reader[0], reader[1:]
    assert header[0] == "IXI_ID" and header[1].startswith("SEX_ID")
    for col in ("HEIGHT", "WEIGHT", "ETHNIC_ID", "MARITAL_ID", "OCCUPATION_ID", "QUALIFICATION_ID",
                "DOB", "DATE_AVAILABLE", "STUDY_DATE", "AGE"):
        assert col in header
    ids = {int(float(r[0])) for r in rows}
    assert {2, 12, 35} <= ids
    assert {int(float(r[1])) for r in rows} <= {1, 2}


# ---------------------------------------------------------------------------------------- VQA-RAD


def test_vqa_rad_json_and_images(demo: Path) -> None:
    root = demo / "vqa_rad"
    records = json.loads((root / "VQA_RAD Dataset Public.json").read_text(encoding="utf-8"))
    assert isinstance(records, list) and len(records) > 20
    fields = {"qid", "phrase_type", "qid_linked_id", "image_case_url", "image_name", "image_organ",
              "evaluation", "question", "question_rephrase", "question_relation", "question_frame",
              "question_type", "answer", "answer_type"}
    for rec in records:
        assert set(rec) == fields
        assert re.fullmatch(r"synpic\d+\.jpg", rec["image_name"])
        assert (root / "VQA_RAD Image Folder" / rec["image_name"]).is_file()
        assert rec["answer_type"] in ("CLOSED", "OPEN")
    assert {r["phrase_type"] for r in records} == {"freeform", "para", "test_freeform", "test_para"}
    assert {r["image_organ"] for r in records} == {"HEAD", "CHEST", "ABD"}
    assert any(isinstance(r["answer"], int) and not isinstance(r["answer"], bool) for r in records)
    assert len({r["qid"] for r in records}) == len(records)
    # paraphrases share the free-form question's linked id and answer
    by_link: dict[str, list[dict]] = {}
    for r in records:
        by_link.setdefault(r["qid_linked_id"], []).append(r)
    pairs = [g for g in by_link.values() if len(g) == 2]
    assert pairs and all(g[0]["answer"] == g[1]["answer"] for g in pairs)
    # test images are never in the training phrase types
    train_imgs = {r["image_name"] for r in records if not r["phrase_type"].startswith("test")}
    test_imgs = {r["image_name"] for r in records if r["phrase_type"].startswith("test")}
    assert not train_imgs & test_imgs


def test_vqa_rad_answers_follow_image_content(demo: Path) -> None:
    root = demo / "vqa_rad"
    records = json.loads((root / "VQA_RAD Dataset Public.json").read_text(encoding="utf-8"))
    counts = {r["image_name"]: r["answer"] for r in records if r["question_type"] == "COUNT"}
    present = {r["image_name"]: str(r["answer"]).lower() for r in records
               if r["question_type"] == "PRES" and r["phrase_type"].endswith("freeform")}
    assert set(counts.values()) >= {0, 1, 2}
    for image, count in counts.items():
        assert present[image] == ("yes" if count else "no")
        with Image.open(root / "VQA_RAD Image Folder" / image) as im:
            assert im.format == "JPEG" and im.mode == "L"
            assert 128 <= min(im.size) and max(im.size) <= 256


# ------------------------------------------------------------------------------------------ SLAKE


def test_slake_layout(demo: Path) -> None:
    root = demo / "slake"
    fields = {"img_id", "img_name", "question", "answer", "q_lang", "location", "modality",
              "answer_type", "base_type", "content_type", "triple", "qid"}
    qids: list[int] = []
    split_images: dict[str, set[str]] = {}
    langs = set()
    for split in ("train", "validate", "test"):
        records = json.loads((root / f"{split}.json").read_text(encoding="utf-8"))
        assert records
        split_images[split] = {r["img_name"] for r in records}
        for rec in records:
            assert set(rec) == fields
            assert re.fullmatch(r"xmlab\d+/source\.jpg", rec["img_name"])
            assert rec["img_name"] == f"xmlab{rec['img_id']}/source.jpg"
            assert isinstance(rec["answer"], str)
            assert rec["answer_type"] in ("OPEN", "CLOSED") and rec["base_type"] in ("vqa", "kvqa")
            assert rec["modality"] in ("CT", "MRI", "X-Ray")
            assert len(rec["triple"]) == 3
            langs.add(rec["q_lang"])
            qids.append(rec["qid"])
            folder = root / "imgs" / rec["img_name"].split("/")[0]
            assert (folder / "source.jpg").is_file()
    assert langs == {"en", "zh"}
    assert len(qids) == len(set(qids))
    assert not split_images["train"] & split_images["test"]
    zh = [r for r in json.loads((root / "train.json").read_text(encoding="utf-8")) if r["q_lang"] == "zh"]
    assert any(re.search(r"[\u4e00-\u9fff]", r["question"]) for r in zh)
    # per-image extras of the release
    names = dict(line.split(":", 1) for line in (root / "mask.txt").read_text().splitlines())
    for folder in sorted((root / "imgs").iterdir()):
        boxes = json.loads((folder / "detection.json").read_text())
        assert isinstance(boxes, list)
        for box in boxes:
            ((organ, xywh),) = box.items()
            assert organ in names.values() and len(xywh) == 4
        mask = np.asarray(Image.open(folder / "mask.png"))
        assert {str(v) for v in np.unique(mask).tolist()} - {"0"} <= set(names)
        assert json.loads((folder / "question.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------- PathVQA


def test_pathvqa_layout_and_restricted_pickle(demo: Path) -> None:
    root = demo / "pathvqa" / "pvqa"
    answers = set()
    for split in ("train", "val", "test"):
        data = (root / "qas" / split / f"{split}_qa.pkl").read_bytes()
        records = _BuiltinsOnly(io.BytesIO(data)).load()
        assert isinstance(records, list) and records
        for rec in records:
            assert set(rec) == {"image", "question", "answer"}
            assert re.fullmatch(rf"{split}_\d{{4}}", rec["image"])
            assert (root / "images" / split / f"{rec['image']}.jpg").is_file()
            answers.add(rec["answer"])
    assert {"yes", "no"} <= answers and len(answers - {"yes", "no"}) >= 2
    with Image.open(root / "images" / "train" / "train_0000.jpg") as im:
        assert im.mode == "RGB"


def test_restricted_unpickler_refuses_globals() -> None:
    evil = pickle.dumps([{"image": "x", "f": Path("a")}])
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        _BuiltinsOnly(io.BytesIO(evil)).load()


def test_ixi_falls_back_to_csv_without_xlwt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "xlwt", None)  # makes `import xlwt` raise ImportError
    root = write_demo_data(tmp_path, ["ixi"])["ixi"]
    assert not (root / "IXI.xls").exists()
    lines = (root / "IXI.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("IXI_ID,") and len(lines) >= 6


def test_scale_adds_images_and_keeps_the_scale_1_files(tmp_path: Path) -> None:
    small = write_demo_data(tmp_path / "small", ["vqa_rad", "slake"])
    big = write_demo_data(tmp_path / "big", ["vqa_rad", "slake"], scale=3)
    for name in ("vqa_rad", "slake"):
        a, b = _hashes(small[name]), _hashes(big[name])
        kept = {k: v for k, v in a.items() if not k.endswith(".json")}  # image files; the JSON lists grow
        assert kept.items() <= b.items() and len(b) > len(a)
    rows_small = json.loads((small["vqa_rad"] / "VQA_RAD Dataset Public.json").read_text())
    rows_big = json.loads((big["vqa_rad"] / "VQA_RAD Dataset Public.json").read_text())
    assert rows_big[: len(rows_small)] == rows_small and len({r["qid"] for r in rows_big}) == len(rows_big)
    extra = rows_big[len(rows_small):]
    # the added closed modality questions are answered from the image: both answers occur
    modality = [r for r in extra if r["question_type"] == "MODALITY" and r["answer_type"] == "CLOSED"]
    assert {r["answer"].lower() for r in modality} == {"yes", "no"}
    assert any(r["phrase_type"].startswith("test_") for r in extra)
    splits = {s: json.loads((big["slake"] / f"{s}.json").read_text()) for s in ("train", "validate", "test")}
    assert all(splits.values()) and len({r["img_id"] for s in splits.values() for r in s}) == 27
    with pytest.raises(ValueError, match="scale"):
        write_demo_data(tmp_path / "bad", ["slake"], scale=0)


def test_per_source_scale_overrides_the_global_one(tmp_path: Path) -> None:
    both = write_demo_data(tmp_path / "both", ["vqa_rad", "slake"], scale=3)
    mixed = write_demo_data(tmp_path / "mixed", ["vqa_rad", "slake"], scale=1, scales={"slake": 3})
    assert _hashes(mixed["slake"]) == _hashes(both["slake"])  # slake at 3, exactly as --scale 3 writes it
    assert _hashes(mixed["vqa_rad"]) == _hashes(write_demo_data(tmp_path / "one", ["vqa_rad"])["vqa_rad"])
    with pytest.raises(ValueError, match=r"no per-source scale for \['ixi'\].*synthrad2023"):
        write_demo_data(tmp_path / "bad", ["ixi"], scales={"ixi": 2})
    with pytest.raises(ValueError, match="scale must be >= 1, got 0 for slake"):
        write_demo_data(tmp_path / "bad", ["slake"], scales={"slake": 0})
