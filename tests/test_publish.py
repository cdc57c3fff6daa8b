import json

from typer.testing import CliRunner

from tests.test_build import MANIFEST, FakeVQ, toy_builder
from vlhealth.build import run_build
from vlhealth.cli import app
from vlhealth.publish import PublishError, plan_publish


def built(tmp_path, access="open"):
    root = tmp_path / "raw"
    root.mkdir(exist_ok=True)
    import numpy as np

    for i in range(3):
        np.save(root / f"p{i}_v.npy", np.full((2, 4, 4), i, np.float32))
    out = tmp_path / f"shards-{access}"
    run_build(toy_builder(), root, out, vq=FakeVQ(), manifest={**MANIFEST, "access": access})
    return out


def test_plan_lists_shards_and_metadata_and_card(tmp_path):
    out = built(tmp_path)
    plan = plan_publish([out])
    dests = [d for _, d in plan.files]
    assert f"data/{out.name}/toy-000000.tar" in dests and f"data/{out.name}/build.json" in dests
    assert "configs:" in plan.card and f"path: data/{out.name}/*.tar" in plan.card
    assert "random `tiny` VQGAN" in plan.card  # FakeVQ reports random weights: the card must warn
    assert str(tmp_path) not in plan.card


def test_credentialed_sources_are_refused(tmp_path):
    out = built(tmp_path, access="credentialed")
    result = CliRunner().invoke(app, ["publish", str(out), "--repo-id", "me/x", "--dry-run"])
    assert result.exit_code == 2
    assert "credentialed" in result.output
    try:
        plan_publish([out])
    except PublishError as exc:
        assert "must never be published" in str(exc)
    else:
        raise AssertionError("credentialed source was not refused")


def test_corrupt_shards_are_refused(tmp_path):
    out = built(tmp_path)
    tar = out / "toy-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-4] + b"oops")
    try:
        plan_publish([out])
    except PublishError as exc:
        assert "index.json" in str(exc)
    else:
        raise AssertionError("corrupt shard was published")
    assert json.loads((out / "build.json").read_text())["manifest"]["access"] == "open"


def test_manifest_marks_restricted_builds_unpublishable(tmp_path):
    from vlhealth.publish import check_publishable

    info = {"source": "omnimedvqa", "manifest": {"name": "omnimedvqa", "access": "registered"},
            "options": {"access": "all"}}
    try:
        check_publishable(tmp_path, info)
    except PublishError as exc:
        assert "--access all" in str(exc)
    else:
        raise AssertionError("a build with OmniMedVQA's Restricted-access part was publishable")
    check_publishable(tmp_path, {**info, "options": {"access": "open"}})  # the Open-access part is fine
    mimic = {"source": "mimic_cxr", "manifest": {"name": "mimic_cxr", "access": "open"}, "options": {}}
    try:  # even a tampered access level cannot get past the manifest's publishable: false
        check_publishable(tmp_path, mimic)
    except PublishError as exc:
        assert "not publishable" in str(exc)
    else:
        raise AssertionError("MIMIC-CXR was publishable")


def test_folders_with_the_same_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = built(tmp_path / "a")
    b = built(tmp_path / "b")
    assert a.name == b.name
    try:
        plan_publish([a, b])
    except PublishError as exc:
        assert "distinct names" in str(exc)
    else:
        raise AssertionError("two folders would have landed in the same data/<name>/")
