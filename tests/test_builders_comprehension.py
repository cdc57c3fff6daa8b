"""Comprehension builders on their demo replica layouts, quirks included, plus rejects and stats."""

from __future__ import annotations

import hashlib
import importlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlhealth.build import run_build
from vlhealth.demo import write_demo_data
from vlhealth.shards import iter_samples, list_shards
from vlhealth.stats import compute_stats
from vlhealth.vqa import RestrictedUnpickler, clean_upstream_answer, normalise_conversation

SOURCES = ["vqa_rad", "slake", "pathvqa", "mimic_cxr_vqa", "llava_med", "pubmedvision", "llava_instruct", "omnimedvqa"]


def build(name: str, root: Path, out: Path, **options):
    module = importlib.import_module(f"vlhealth.builders.{name}")
    summary = run_build(module, root, out, options=module.Options(**options), command=["vlhealth", "build", name])
    samples = {s.key: s for s in iter_samples(out)}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    return summary, samples, rejects


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    write_demo_data(out, sources=SOURCES)
    return out


@pytest.fixture(scope="module")
def built(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    shards = tmp_path_factory.mktemp("shards")
    return {name: build(name, demo / name, shards / name) for name in SOURCES}


def copy_source(demo: Path, name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(demo / name, root)
    return root


def reasons(rejects: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejects:
        assert r["file"] and r["reason"], r  # every reject names the file and the reason
        assert not r["file"].startswith("/") and "/tmp" not in r["reason"]
        out[r["reason"].split(":")[0]] = out.get(r["reason"].split(":")[0], 0) + 1
    return out


# -- shared logic ---------------------------------------------------------------------------------
def test_answer_normalisation() -> None:
    assert clean_upstream_answer(2) == "2"
    assert clean_upstream_answer(2.0) == "2"
    assert clean_upstream_answer("2.0") == "2"
    assert clean_upstream_answer(0.5) == "0.5"
    assert clean_upstream_answer(" Yes ") == "yes"
    assert clean_upstream_answer(["left lung", "right lung"]) == "left lung, right lung"
    assert clean_upstream_answer("  ") == ""


def test_conversation_normalisation() -> None:
    conv = normalise_conversation([{"from": "user", "value": "Hi?"}, {"from": "assistant", "value": "Hello."}],
                                  has_image=True)
    assert conv[0] == {"from": "human", "value": "<image>\nHi?"} and conv[1]["from"] == "gpt"
    with pytest.raises(ValueError, match="multi-image"):
        normalise_conversation([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
                               has_image=True)
    with pytest.raises(ValueError, match="empty answer"):
        normalise_conversation([{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}], has_image=False)


def test_restricted_unpickler_admits_builtins_only(tmp_path: Path) -> None:
    import io
    import os

    good = pickle.dumps([{"image": "train_0000", "question": "q", "answer": "yes"}])
    assert RestrictedUnpickler(io.BytesIO(good)).load()[0]["answer"] == "yes"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


# -- each builder on its replica ------------------------------------------------------------------
def test_vqa_rad(demo: Path, built: dict) -> None:
    summary, samples, rejects = built["vqa_rad"]
    rows = json.loads((demo / "vqa_rad" / "VQA_RAD Dataset Public.json").read_text())
    assert summary.samples == len(rows) and not rejects
    # Upstream test split preserved exactly: phrase_type test_freeform / test_para.
    test_qids = {str(r["qid"]) for r in rows if r["phrase_type"].startswith("test_")}
    assert {k.split("-", 1)[1] for k, s in samples.items() if s.record.split == "test"} == test_qids
    assert {s.record.split for s in samples.values()} == {"train", "test"}
    # Numeric answers become text; yes/no lower-cased; closed/open from the upstream label.
    counts = [s for s in samples.values() if s.record.extra.get("question_type") == "COUNT"]
    assert counts and all(s.record.conversations[1]["value"].isdigit() for s in counts)
    closed = [s for s in samples.values() if s.record.answer_type == "closed"]
    assert closed and all(s.record.conversations[1]["value"] in ("yes", "no") for s in closed)
    # Upstream JPEG bytes verbatim, group = image id, stable keys.
    s = samples[f"vqa_rad-{rows[0]['qid']}"]
    image = demo / "vqa_rad" / "VQA_RAD Image Folder" / rows[0]["image_name"]
    assert s.input_image == image.read_bytes()
    assert s.record.group == f"VQA_RAD_Image_Folder_{Path(rows[0]['image_name']).stem}"
    assert s.record.extra["phash"] and s.record.provenance["image"].endswith(rows[0]["image_name"])


def test_vqa_rad_quirks_rejects_and_forms(demo: Path, tmp_path: Path) -> None:
    root = copy_source(demo, "vqa_rad", tmp_path)
    path = root / "VQA_RAD Dataset Public.json"
    rows = json.loads(path.read_text())
    base = dict(rows[0])
    rows += [
        {**base, "qid": 9001, "answer": ""},  # empty answer
        {**base, "qid": 9002, "image_name": "synpic0.jpg"},  # missing image
        {**base, "qid": 9003, "answer": 3.0, "answer_type": "OPEN"},  # float count
        {"qid": 9004, "question": "no image field"},  # bad row
        "not a row",
    ]
    path.write_text(json.dumps(rows))
    summary, samples, rejects = build("vqa_rad", root, tmp_path / "out", forms="both")
    assert reasons(rejects) == {"empty answer": 1, "missing image": 1, "bad row": 2}
    missing = next(r for r in rejects if r["reason"] == "missing image")
    assert missing["file"] == "VQA_RAD Image Folder/synpic0.jpg"
    assert all(r["file"] == "VQA_RAD Dataset Public.json" for r in rejects if r["reason"] != "missing image")
    assert samples["vqa_rad-9003"].record.conversations[1]["value"] == "3"
    # --forms both: every closed yes/no question also as a single choice listing its options.
    closed = [k for k, s in samples.items() if s.record.answer_type == "closed"]
    choice = {k: s for k, s in samples.items() if s.record.answer_type == "choice"}
    assert closed and {f"{k}-choice" for k in closed} == set(choice)
    one = next(iter(choice.values()))
    assert one.record.options == ["yes", "no"] and one.record.conversations[1]["value"] in ("yes", "no")
    assert "A. yes\nB. no" in one.record.conversations[0]["value"]
    # --forms choice: closed questions only as choice, same keys as the open form.
    _s, only_choice, _r = build("vqa_rad", root, tmp_path / "out2", forms="choice")
    assert {s.record.answer_type for s in only_choice.values()} == {"open", "choice"}
    assert set(only_choice) == set(samples) - set(choice)


def test_slake(demo: Path, built: dict, tmp_path: Path) -> None:
    summary, samples, rejects = built["slake"]
    assert not rejects and {s.record.split for s in samples.values()} == {"train", "val", "test"}
    en = sum(1 for f in ("train.json", "validate.json", "test.json")
             for r in json.loads((demo / "slake" / f).read_text()) if r["q_lang"] == "en")
    assert summary.samples == en
    s = next(iter(samples.values()))
    assert {s.record.modality for s in samples.values()} == {"CT", "MRI", "X-ray"}  # upstream "X-Ray"
    assert s.record.body_part and s.record.body_part == s.record.body_part.lower()
    assert s.record.group.startswith("imgs_xmlab")
    # validation.json spelling, --lang all
    root = copy_source(demo, "slake", tmp_path)
    (root / "validate.json").rename(root / "validation.json")
    summary_all, all_samples, _ = build("slake", root, tmp_path / "out", lang="all")
    assert summary_all.samples > summary.samples
    assert {s.record.split for s in all_samples.values()} == {"train", "val", "test"}
    assert {s.record.extra["q_lang"] for s in all_samples.values()} == {"en", "zh"}


def test_pathvqa(demo: Path, built: dict, tmp_path: Path) -> None:
    summary, samples, rejects = built["pathvqa"]
    assert not rejects and {s.record.split for s in samples.values()} == {"train", "val", "test"}
    for s in samples.values():
        answer = s.record.conversations[1]["value"]
        assert s.record.answer_type == ("closed" if answer in ("yes", "no") else "open")
    assert "pathvqa-test-000000" in samples
    # A pickle carrying code is refused (with its file), the other splits still build.
    root = copy_source(demo, "pathvqa", tmp_path)
    evil = root / "pvqa" / "qas" / "val" / "val_qa.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    _s, samples2, rejects2 = build("pathvqa", root, tmp_path / "out")
    assert [(r["file"], r["reason"].split(":")[0]) for r in rejects2] == [("pvqa/qas/val/val_qa.pkl", "unsafe pickle")]
    assert {s.record.split for s in samples2.values()} == {"train", "test"}


def test_mimic_cxr_vqa(demo: Path, built: dict, tmp_path: Path) -> None:
    summary, samples, rejects = built["mimic_cxr_vqa"]
    assert reasons(rejects) == {"bad row": 1, "missing image": 1}
    assert {s.record.split for s in samples.values()} == {"train", "val", "test"}
    verify = [s for s in samples.values() if s.record.extra["semantic_type"] == "verify"]
    assert verify and all(s.record.answer_type == "closed" for s in verify)
    rows = json.loads((demo / "mimic_cxr_vqa" / "mimiccxrvqa" / "dataset" / "test.json").read_text())
    empty = [r for r in rows if r["answer"] == [] and r["semantic_type"] != "verify"]
    assert empty and samples[f"mimic_cxr_vqa-test-{empty[0]['idx']}"].record.conversations[1]["value"] == "none"
    assert all(s.record.provenance["image"].startswith("files/p1") for s in samples.values())
    # Images in a separate MIMIC-CXR-JPG folder (--mimic-cxr-jpg).
    root = copy_source(demo, "mimic_cxr_vqa", tmp_path)
    jpg = tmp_path / "mimic-cxr-jpg"
    jpg.mkdir()
    (root / "files").rename(jpg / "files")
    summary2, samples2, _ = build("mimic_cxr_vqa", root, tmp_path / "out", mimic_cxr_jpg=str(jpg))
    assert set(samples2) == set(samples)
    options = json.loads((tmp_path / "out" / "build.json").read_text())
    assert options["manifest"]["access"] == "credentialed"


def test_llava_med(built: dict) -> None:
    summary, samples, rejects = built["llava_med"]
    assert reasons(rejects) == {"empty answer": 1, "bad row": 1, "missing image": 1}
    assert {r["file"] for r in rejects} == {"llava_med_instruct_10k.json", "images/PMC0000000_fig1.jpg"}
    subtasks = {s.record.subtask for s in samples.values()}
    assert subtasks == {"caption", "conversation"}
    conv = [s for s in samples.values() if s.record.subtask == "conversation"]
    assert len(conv) == 4 and all(len(s.record.conversations) == 4 for s in conv)  # incl. the misspelt key
    assert all(s.record.conversations[0]["value"].count("<image>") == 1 for s in samples.values())


def test_pubmedvision(built: dict) -> None:
    summary, samples, rejects = built["pubmedvision"]
    assert reasons(rejects) == {"multi-image": 1}
    assert json.loads((summary.out / "build.json").read_text())["counts"]["rejects"] == 1
    assert all(s.record.conversations[0]["value"].startswith("<image>\n") for s in samples.values())
    assert "pubmedvision-instruction-instruct_1" in samples  # the record that lacked <image>
    assert all(s.record.modality and s.record.body_part for s in samples.values())


def test_llava_instruct_text_only_modes(demo: Path, built: dict, tmp_path: Path) -> None:
    summary, samples, rejects = built["llava_instruct"]
    assert reasons(rejects) == {"bad row": 1, "missing image": 1}
    prefixes = {s.record.provenance["image"].split("/")[0] for s in samples.values()}
    assert prefixes == {"coco", "gqa", "ocr_vqa", "textvqa", "vg"}
    assert {s.record.source for s in samples.values()} == {"llava_665k"}
    assert all(s.input_image is not None for s in samples.values())
    root = demo / "llava_instruct"
    _s, text, _r = build("llava_instruct", root, tmp_path / "text", text_only="only")
    assert set(text) == {"llava_665k-sharegpt_0001", "llava_665k-sharegpt_0002"}
    assert all(s.input_image is None and s.record.n_images == 0 for s in text.values())
    assert len(text["llava_665k-sharegpt_0002"].record.conversations) == 2  # dangling question dropped
    _s, both, _r = build("llava_instruct", root, tmp_path / "both", text_only="include")
    assert set(both) == set(samples) | set(text)


def test_llava_558k_captions(tmp_path: Path) -> None:
    import numpy as np

    from vlhealth.demo._io import write_jpeg, write_json
    from vlhealth.demo._vl import natural_image

    rng = np.random.default_rng(0)
    root = tmp_path / "LLaVA-Pretrain"
    rows = []
    for i in range(3):
        rel = f"00{i}53/00{i}539375.jpg"
        write_jpeg(root / "images" / rel, natural_image(rng, (64, 64)))
        rows.append({"id": f"00{i}539375", "image": rel, "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": f"a picture number {i}"}]})
    write_json(root / "blip_laion_cc_sbu_558k.json", rows)
    summary, samples, rejects = build("llava_instruct", root, tmp_path / "out")
    assert not rejects and summary.samples == 3
    assert {(s.record.source, s.record.subtask) for s in samples.values()} == {("llava_558k", "caption")}


def test_omnimedvqa(demo: Path, built: dict, tmp_path: Path) -> None:
    summary, samples, rejects = built["omnimedvqa"]
    assert reasons(rejects) == {"unreadable image": 1, "answer not in options": 1}
    assert {s.record.split for s in samples.values()} == {"test"}
    assert {s.record.answer_type for s in samples.values()} == {"choice"}
    for s in samples.values():
        assert s.record.conversations[1]["value"] in s.record.options
        assert "Options:\nA. " in s.record.conversations[0]["value"]
    # modality_type (Open-access) and modality (Restricted-access) both land in `modality`.
    by_part = {s.record.provenance["file"].split("/")[1]: s.record.modality for s in samples.values()}
    assert by_part["Open-access"] and by_part["Restricted-access"]
    assert any(len(s.record.options) == 2 for s in samples.values())
    assert {s.record.modality for s in samples.values()} <= {"CT", "MRI", "X-ray"}
    assert any(s.record.provenance.get("modality_upstream") == "CT(Computed Tomography)" for s in samples.values())
    formats = {s.input_format for s in samples.values()}
    assert formats == {"jpg", "png"}
    _s, only_open, _r = build("omnimedvqa", demo / "omnimedvqa", tmp_path / "open", access="open")
    assert {s.record.provenance["file"].split("/")[1] for s in only_open.values()} == {"Open-access"}
    # --image-format jpg: one member set in the folder.
    _s, jpg, _r = build("omnimedvqa", demo / "omnimedvqa", tmp_path / "jpg", image_format="jpg")
    assert {s.input_format for s in jpg.values()} == {"jpg"} and set(jpg) == set(samples)


# -- whole demo -----------------------------------------------------------------------------------
def test_stats_show_every_source_split_and_answer_type(built: dict) -> None:
    stats = compute_stats([summary.out for summary, _s, _r in built.values()])
    assert set(stats["by"]["source"]) == {"vqa_rad", "slake", "pathvqa", "mimic_cxr_vqa", "llava_med",
                                          "pubmedvision", "llava_665k", "omnimedvqa"}
    assert set(stats["by"]["split"]) == {"train", "val", "test"}
    assert set(stats["by"]["answer_type"]) == {"open", "closed", "choice"}
    assert set(stats["by"]["subtask"]) == {"vqa", "caption", "conversation"}


def test_builds_are_deterministic(demo: Path, built: dict, tmp_path: Path) -> None:
    build("llava_med", demo / "llava_med", tmp_path / "again")
    first = built["llava_med"][0].out
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in list_shards(first)]
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in list_shards(tmp_path / "again")] == digest


def test_cli_build_with_forms(demo: Path, tmp_path: Path) -> None:
    from vlhealth.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["build", "vqa-rad", str(demo / "vqa_rad"), "--out", str(out), "--forms", "both"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "build.json").read_text())
    assert info["options"]["forms"] == "both" and str(tmp_path) not in json.dumps(info)
    assert any(k.endswith("-choice") for k, _r, _s in __import__("vlhealth.shards").shards.iter_records(out))


# -- review regressions ---------------------------------------------------------------------------
def test_pathvqa_splits_json_says_upstream(built: dict) -> None:
    # PathVQA records carry the source's own split: splits.json must say so, not list a seeded
    # assignment that calls every image "train".
    summary, _samples, _rejects = built["pathvqa"]
    splits = json.loads((summary.out / "splits.json").read_text())
    assert splits["upstream"] is True and splits["groups"] == {}


def test_mimic_cxr_jpg_option_keeps_absolute_paths_out_of_build_json(demo: Path, tmp_path: Path) -> None:
    root = copy_source(demo, "mimic_cxr_vqa", tmp_path)
    jpg = tmp_path / "mimic-cxr-jpg"
    jpg.mkdir()
    (root / "files").rename(jpg / "files")
    summary, samples, _r = build("mimic_cxr_vqa", root, tmp_path / "out", mimic_cxr_jpg=str(jpg.resolve()))
    assert samples
    recorded = json.loads((tmp_path / "out" / "build.json").read_text())["options"]["mimic_cxr_jpg"]
    assert not recorded.startswith("/") and Path(recorded).resolve() == jpg.resolve()


def test_ids_that_sanitise_to_the_same_key_do_not_crash_the_build(demo: Path, tmp_path: Path) -> None:
    # Upstream ids "dup.x" and "dup_x" both become key "..._dup_x": the build must keep both
    # samples under distinct keys instead of failing on duplicate item ids / sample keys.
    root = copy_source(demo, "llava_med", tmp_path)
    path = root / "llava_med_alignment_500k.json"
    rows = json.loads(path.read_text())
    good = next(r for r in rows if (root / "images" / r["image"]).is_file())
    rows += [{**good, "id": "dup.x"}, {**good, "id": "dup_x"}]
    path.write_text(json.dumps(rows))
    summary, samples, _r = build("llava_med", root, tmp_path / "out", files=["llava_med_alignment_500k.json"])
    dup = sorted(k for k in samples if "dup_x" in k)
    assert len(dup) == 2 and len(set(dup)) == 2
    assert {samples[k].record.provenance["id"] for k in dup} == {"dup.x", "dup_x"}

    root = copy_source(demo, "omnimedvqa", tmp_path)
    path = next((root / "QA_information" / "Open-access").glob("*.json"))
    rows = json.loads(path.read_text())
    rows += [{**rows[0], "question_id": "q 1"}, {**rows[0], "question_id": "q_1"}]
    path.write_text(json.dumps(rows))
    _s, samples, rejects = build("omnimedvqa", root, tmp_path / "out2")
    assert {samples[k].record.provenance["question_id"] for k in samples if "q_1" in k} == {"q 1", "q_1"}


def test_omnimedvqa_image_path_prefix_is_not_character_stripped(demo: Path, tmp_path: Path) -> None:
    # "./Images/x" is Images/x, but "../x" escapes the root and "..Images" is another name:
    # refuse the escape instead of silently reading a different file.
    root = copy_source(demo, "omnimedvqa", tmp_path)
    path = next((root / "QA_information" / "Open-access").glob("*.json"))
    rows = json.loads(path.read_text())
    rows += [{**rows[0], "question_id": "dot_slash", "image_path": "./" + rows[0]["image_path"]},
             {**rows[0], "question_id": "escape", "image_path": "../" + rows[0]["image_path"]}]
    path.write_text(json.dumps(rows))
    _s, samples, rejects = build("omnimedvqa", root, tmp_path / "out")
    assert "omnimedvqa-dot_slash" in samples and "omnimedvqa-escape" not in samples
    assert any(r["item"] == "escape" and r["reason"].startswith("unsafe path") for r in rejects)


def test_llava_keys_do_not_depend_on_text_only_mode(demo: Path, tmp_path: Path) -> None:
    # 665k repeats ids; the n-th record with an id must get the same key whichever records
    # --text-only (or the multi-image rule) leaves out.
    root = copy_source(demo, "llava_instruct", tmp_path)
    path = root / "llava_v1_5_mix665k.json"
    rows = json.loads(path.read_text())
    image_row = next(r for r in rows if r.get("image") and (root / r["image"]).is_file() and "conversations" in r)
    rows.insert(0, {"id": image_row["id"], "conversations": [{"from": "human", "value": "Hi?"},
                                                             {"from": "gpt", "value": "Hello."}]})
    path.write_text(json.dumps(rows))
    _s, images, _r = build("llava_instruct", root, tmp_path / "img")
    _s, text, _r = build("llava_instruct", root, tmp_path / "text", text_only="only")
    _s, both, _r = build("llava_instruct", root, tmp_path / "both", text_only="include")
    assert set(both) == set(images) | set(text) and not set(images) & set(text)


def test_conversation_starting_with_a_gpt_turn_is_kept_like_llava() -> None:
    # LLaVA's preprocessing skips a leading non-human turn (ShareGPT rows of 665k start so).
    conv = normalise_conversation([{"from": "gpt", "value": "Hi, how can I help?"},
                                   {"from": "human", "value": "What is CT?"},
                                   {"from": "gpt", "value": "Computed tomography."}], has_image=False)
    assert [t["from"] for t in conv] == ["human", "gpt"] and conv[0]["value"] == "What is CT?"


def test_modality_with_parenthesised_expansion_is_canonical() -> None:
    from vlhealth.vqa import canonical_modality

    assert canonical_modality("OCT (Optical Coherence Tomography)") == "OCT"
    assert canonical_modality("CT(Computed Tomography)") == "CT"
    assert canonical_modality("MR (Mag-netic Resonance Imaging)") == "MRI"
    assert canonical_modality("Fundus Photography") == "fundus"


def test_restricted_unpickler_refuses_non_data_builtins() -> None:
    # list(range(10**10)) would exhaust memory instead of being refused: only data types are admitted.
    import io

    bomb = b"c__builtin__\nlist\n(c__builtin__\nrange\n(I10000000000\ntRtR."
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        RestrictedUnpickler(io.BytesIO(bomb)).load()
    assert RestrictedUnpickler(io.BytesIO(pickle.dumps({1, 2}, protocol=2))).load() == {1, 2}
