"""The fuzz corpus (issue 12): every bad input through its builder, refused with the file and a clear,
deterministic reason, while every good sample lands and memory stays bounded; plus property tests of
the answer normaliser and the schema validator, and verification of the tars eval reads."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import fuzz_inputs
from vlhealth.build import run_build
from vlhealth.demo import write_demo_data
from vlhealth.schema import Record, SchemaError
from vlhealth.shards import ShardError, iter_samples, iter_tar, list_shards, verify_tars
from vlhealth.vqa import clean_upstream_answer, normalise_text, text_value

REPO = Path(__file__).resolve().parents[1]


def _builder(name: str):
    try:
        return importlib.import_module(f"vlhealth.builders.{name}")
    except ImportError:
        return importlib.import_module(f"builders.{name}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    write_demo_data(out, sources=["pubmedvision", "llava_med", "vqa_rad", "synthrad2023"])
    return out


def _copy(demo: Path, name: str, dest: Path) -> Path:
    shutil.copytree(demo / name, dest, symlinks=True)
    return dest


def _build(name: str, root: Path, out: Path, **kw):
    module = _builder(name)
    summary = run_build(module, root, out, options=module.Options(), command=["vlhealth", "build", name], **kw)
    keys = sorted(s.key for s in iter_samples(out))
    return summary, keys, (out / "rejects.jsonl").read_bytes()


def _check_rejects(rejects: bytes, expected: dict[str, tuple[str, str]]) -> None:
    rows = [json.loads(line) for line in rejects.decode().splitlines()]
    for marker, (file, pattern) in expected.items():
        hits = [r for r in rows if r["file"] == file and re.search(pattern, r["reason"])]
        assert hits, f"{marker}: no reject for {file} matching {pattern!r} in\n" + "\n".join(map(str, rows))
    for r in rows:  # deterministic and about the user's input: no memory addresses, no absolute paths
        assert " at 0x" not in r["reason"] and not r["file"].startswith("/") and "/tmp" not in r["reason"], r


def _clean_and_corrupt(demo: Path, tmp_path: Path, name: str, corrupt, *args) -> tuple[list[str], Path, dict]:
    clean = _copy(demo, name, tmp_path / "clean")
    _, keys, _ = _build(name, clean, tmp_path / "out-clean")
    bad = _copy(demo, name, tmp_path / "bad")
    return keys, bad, corrupt(bad, *args)


# -- comprehension ----------------------------------------------------------------------------------
def test_pubmedvision_corpus_refused_good_kept_deterministic(demo: Path, tmp_path: Path) -> None:
    keys, bad, expected = _clean_and_corrupt(demo, tmp_path, "pubmedvision", fuzz_inputs.corrupt_pubmedvision,
                                             tmp_path / "outside")
    summary, got, rejects = _build("pubmedvision", bad, tmp_path / "out1")
    assert got == keys  # every good sample landed, nothing bad got in
    _check_rejects(rejects, expected)
    _, again, rejects2 = _build("pubmedvision", bad, tmp_path / "out2")
    assert again == keys and rejects2 == rejects  # the same corpus twice: byte-identical rejects.jsonl
    secret = (tmp_path / "outside" / "secret.jpg").read_bytes()
    assert all(secret not in p.read_bytes() for p in list_shards(tmp_path / "out1"))


def test_annotation_file_that_stops_being_utf8_keeps_the_rows_before(demo: Path, tmp_path: Path) -> None:
    keys, bad, expected = _clean_and_corrupt(demo, tmp_path, "pubmedvision", fuzz_inputs.corrupt_pubmedvision_encoding)
    _, got, rejects = _build("pubmedvision", bad, tmp_path / "out")
    assert got == keys
    _check_rejects(rejects, expected)


def test_llava_med_json_lines_refuse_bad_lines_only(demo: Path, tmp_path: Path) -> None:
    clean = _copy(demo, "llava_med", tmp_path / "clean")
    fuzz_inputs.corrupt_llava_med(clean)
    text = (clean / "llava_med_instruct_extra.jsonl").read_bytes().splitlines()
    (clean / "llava_med_instruct_extra.jsonl").write_bytes(b"\n".join(text[:-4]) + b"\n")  # the good lines only
    _, keys, _ = _build("llava_med", clean, tmp_path / "out-clean")
    bad = _copy(demo, "llava_med", tmp_path / "bad")
    expected = fuzz_inputs.corrupt_llava_med(bad)
    _, got, rejects = _build("llava_med", bad, tmp_path / "out")
    assert got == keys and any(k.startswith("llava_med-instruct_extra") for k in got)
    _check_rejects(rejects, expected)


def test_vqa_rad_answers_must_be_text(demo: Path, tmp_path: Path) -> None:
    keys, bad, expected = _clean_and_corrupt(demo, tmp_path, "vqa_rad", fuzz_inputs.corrupt_vqa_rad)
    _, got, rejects = _build("vqa_rad", bad, tmp_path / "out")
    assert got == keys
    _check_rejects(rejects, expected)


def test_corpus_through_the_cli_exit_code_and_peak_memory(demo: Path, tmp_path: Path) -> None:
    """The whole PubMedVision corpus (13000x13000 palette PNG, 10,000-deep JSON, 1 MB question, ...) through
    ``vlhealth build --strict`` in a child process: exit status 1 (inputs refused), peak RSS bounded (the
    palette PNG alone took 1.5 GB before it was refused from its header)."""
    bad = _copy(demo, "pubmedvision", tmp_path / "bad")
    fuzz_inputs.corrupt_pubmedvision(bad, tmp_path / "outside")
    # peak RSS from the child's own VmHWM: ru_maxrss after exec also counts the pre-exec copy of this
    # (large, late in a full test session) pytest process, which made the bound fail for the wrong reason
    child = ("import re, sys\nfrom vlhealth.cli import app\n"
             f"sys.argv = ['vlhealth', 'build', 'pubmedvision', {str(bad)!r}, '--out', {str(tmp_path / 'out')!r}, "
             "'--strict']\ntry:\n    app()\nexcept SystemExit as exc:\n    code = exc.code\nelse:\n    code = 0\n"
             "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
             "print('RESULT', code, int(hwm) // 1024, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=REPO, timeout=300)
    result = [line for line in done.stderr.splitlines() if line.startswith("RESULT")]
    assert result, done.stderr[-2000:]
    _, code, rss_mib = result[-1].split()
    assert int(code) == 1, done.stdout + done.stderr[-2000:]
    assert 50 < int(rss_mib) < 600, f"peak RSS {rss_mib} MiB"
    assert "rejected" in done.stdout + done.stderr


# -- generation / volumes -------------------------------------------------------------------------
def test_synthrad_negative_pixdim_refused(demo: Path, tmp_path: Path) -> None:
    from tests.test_builders_generation import FakeVQ

    clean = _copy(demo, "synthrad2023", tmp_path / "clean")
    bad = _copy(demo, "synthrad2023", tmp_path / "bad")
    expected = fuzz_inputs.corrupt_synthrad(bad)
    module = _builder("synthrad")
    options = module.Options(anatomy="brain", recon="none")  # the bad patient is a brain one; keep the test short
    run_build(module, clean, tmp_path / "out-clean", options=options, vq=FakeVQ(), command=["x"])
    run_build(module, bad, tmp_path / "out", options=options, vq=FakeVQ(), command=["x"])
    assert sorted(s.key for s in iter_samples(tmp_path / "out")) == sorted(s.key for s in iter_samples(tmp_path / "out-clean"))
    _check_rejects((tmp_path / "out" / "rejects.jsonl").read_bytes(), expected)


def test_dicom_folder_with_two_series_is_refused_naming_the_folder(tmp_path: Path) -> None:
    from tests.test_volumes import _marked_array, _write_dicom_series
    from vlhealth.volumes import VolumeError, read_volume

    a = _marked_array((4, 5, 6))
    _write_dicom_series(tmp_path / "root" / "mixed", a, (1.0, 1.0, 2.0), "1.2.3.4.5.111")
    _write_dicom_series(tmp_path / "root" / "mixed", a[::-1].copy(), (1.0, 1.0, 3.0), "1.2.3.4.5.222")
    with pytest.raises(VolumeError, match=r"^mixed: .*2 DICOM series"):
        read_volume(tmp_path / "root" / "mixed", root=tmp_path / "root")


# -- shards read by eval and the trainer --------------------------------------------------------
@pytest.fixture
def built_vqa_rad(demo: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    _build("vqa_rad", demo / "vqa_rad", out, max_count=20)
    return out


def test_flipped_bytes_refused_by_sha256_naming_the_tar(built_vqa_rad: Path) -> None:
    from healthgpt.evaluation.evaluate import EvalError, _iter_members

    tars = list_shards(built_vqa_rad)
    assert verify_tars(tars) == len(tars)
    data = bytearray(tars[0].read_bytes())
    jpeg = data.find(b"\xff\xd8\xff")
    data[jpeg + 200] ^= 0xFF  # one flipped byte inside a JPEG: still a valid tar
    tars[0].write_bytes(bytes(data))
    with pytest.raises(ShardError, match=re.escape(tars[0].name) + r": sha256 [0-9a-f]{16}\.\.\. differs from index\.json"):
        verify_tars(tars)
    with pytest.raises(EvalError, match=re.escape(tars[0].name)):
        next(_iter_members([built_vqa_rad], None))
    assert next(_iter_members([built_vqa_rad], None, verify=False))  # --no-verify reads it anyway


def test_truncated_tar_member_named(built_vqa_rad: Path) -> None:
    tar = list_shards(built_vqa_rad)[0]
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=re.escape(tar.name)):
        verify_tars([tar])
    with pytest.raises(ShardError, match=re.escape(tar.name)):
        for _ in iter_tar(tar):
            pass


def test_corrupt_vq_member_error_names_tar_and_sample() -> None:
    from healthgpt.evaluation.evaluate import EvalError, _sample
    from tests.helpers import generation_sample

    members = generation_sample(0).to_members()
    members["target.vq.npy"] = b"\x93NUMPY garbage"
    with pytest.raises(EvalError, match=r"^toy-000000\.tar: sample 'toy-gen-00000': .*target\.vq\.npy|^toy-000000\.tar: sample 'toy-gen-00000'"):
        _sample("toy-gen-00000", members, "toy-000000.tar")


# -- property tests -------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=50))


@settings(max_examples=200, deadline=None)
@given(scalars)
def test_normalised_text_is_clean_and_idempotent(value) -> None:
    text = normalise_text(value)
    assert isinstance(text, str)
    assert text == text.strip() and "  " not in text and "\n" not in text and "\t" not in text
    assert normalise_text(text) == text
    assert clean_upstream_answer(clean_upstream_answer(value)) == clean_upstream_answer(value)
    if text.lower() in ("yes", "no"):
        assert clean_upstream_answer(value) == text.lower()


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.dictionaries(st.text(max_size=5), scalars, max_size=3),
                 st.lists(st.one_of(scalars, st.lists(scalars, max_size=2)), min_size=1, max_size=3)))
def test_containers_are_never_text(value) -> None:
    with pytest.raises(ValueError, match=r"^bad row: answer is a JSON (object|list), expected a string or a number$"):
        text_value(value, "answer")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=10), st.integers()), max_size=4))
def test_list_answers_only_where_allowed(values) -> None:
    assert text_value(values, "answer", allow_list=True) == normalise_text(values)


turn_text = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() and "<image>" not in s and "<target_image>" not in s)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["human", "gpt", "user", ""]), st.one_of(turn_text, st.just(""), st.integers())),
                min_size=0, max_size=5),
       st.sampled_from(["open", "closed", "choice", None]))
def test_record_validator_accepts_exactly_the_well_formed(turns, answer_type) -> None:
    conv = [{"from": r, "value": v} for r, v in turns]
    well_formed = (len(conv) >= 2 and len(conv) % 2 == 0
                   and all(t["from"] == ("human", "gpt")[i % 2] for i, t in enumerate(conv))
                   and all(isinstance(t["value"], str) and t["value"].strip() for t in conv)
                   and answer_type in ("open", "closed"))
    try:
        rec = Record(task="comprehension", subtask="vqa", source="toy", split="train", conversations=conv,
                     group="g", license="CC0", answer_type=answer_type)
    except SchemaError:
        assert not well_formed
    else:
        assert well_formed
        assert Record(**json.loads(json.dumps(rec.to_json()))) == rec  # what is written reads back the same


def test_hashed_key_set_agrees_with_a_set() -> None:
    from vlhealth.itemstore import HashedKeySet

    rng = np.random.default_rng(0)
    keys = [f"k{int(v)}" for v in rng.integers(0, 5000, 20000)]
    hashed, plain = HashedKeySet(), set()
    for k in keys:
        assert hashed.add(k) == (k not in plain)
        plain.add(k)
    assert len(hashed) == len(plain) and all(k in hashed for k in plain) and "absent" not in hashed


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)),
    max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(st.lists(json_values, max_size=6), st.sampled_from(["list", "lines", "object"]))
def test_streamed_rows_equal_json_loads(tmp_path_factory, rows, shape) -> None:
    from vlhealth.jsonstream import iter_json_rows

    path = tmp_path_factory.mktemp("rows") / "rows.json"
    if shape == "list":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        expected = list(enumerate(rows))
    elif shape == "lines":
        rows = [{"row": r} for r in rows] + [{"last": 1}, {"end": 2}]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        expected = list(enumerate(rows, 1))
    else:
        table = {f"k{i}": {"row": r} for i, r in enumerate(rows)}
        path.write_text(json.dumps(table, indent=1), encoding="utf-8")
        expected = [(i, {**v, "_id": k}) for i, (k, v) in enumerate(table.items())]
    assert list(iter_json_rows(path, "rows.json")) == expected
