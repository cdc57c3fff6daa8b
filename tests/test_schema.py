import json

import numpy as np
import pytest

from tests.helpers import generation_sample, vqa_sample
from vlhealth.schema import Record, Sample, SchemaError, safe_key


def record(**over):
    base = dict(
        task="comprehension", subtask="vqa", source="vqa_rad", split="train",
        conversations=[{"from": "human", "value": "<image>\nIs there a fracture?"}, {"from": "gpt", "value": "no"}],
        group="synpic1", license="CC0-1.0", answer_type="closed",
    )
    base.update(over)
    return base


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"task": "understanding"}, "task"),
        ({"subtask": "ct2mri"}, "subtask"),
        ({"split": "dev"}, "split"),
        ({"answer_type": "yesno"}, "answer_type"),
        ({"answer_type": None}, "answer_type"),
        ({"answer_type": "choice"}, "options"),
        ({"answer_type": "choice", "options": ["A"]}, "options"),
        ({"options": ["yes", "no"]}, "options"),
        ({"source": ""}, "source"),
        ({"conversations": [{"from": "human", "value": "<image>\nQ?"}]}, "conversations"),
        ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, "conversations"),
        ({"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": " "}]}, "conversations"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}]}, "conversations"),
        ({"provenance": {"file": "/home/alice/data/x.dcm"}}, "provenance"),
    ],
)
def test_invalid_records_name_the_field(override, field):
    with pytest.raises(SchemaError) as err:
        Record(**record(**override))
    assert err.value.field == field
    assert repr(field) in str(err.value)


def test_choice_answer_must_be_an_option():
    ok = Record(**record(answer_type="choice", options=["CT", "MRI", "X-ray"],
                         conversations=[{"from": "human", "value": "<image>\nWhich modality?"}, {"from": "gpt", "value": "MRI"}]))
    assert ok.options == ["CT", "MRI", "X-ray"]
    with pytest.raises(SchemaError, match="none of the options"):
        Record(**record(answer_type="choice", options=["CT", "MRI"],
                        conversations=[{"from": "human", "value": "<image>\nWhich?"}, {"from": "gpt", "value": "PET"}]))


def test_generation_needs_target_token_and_target():
    gen = dict(task="generation", subtask="mri2ct", answer_type=None,
               conversations=[{"from": "human", "value": "<image>\nConvert"}, {"from": "gpt", "value": "here"}])
    with pytest.raises(SchemaError) as err:
        Record(**record(**gen))
    assert err.value.field == "conversations"
    rec = Record(**record(**{**gen, "conversations": [gen["conversations"][0], {"from": "gpt", "value": "<target_image>"}]}))
    with pytest.raises(SchemaError) as err:
        Sample(key="x-1", record=rec, input_image=np.zeros((8, 8), np.uint8))
    assert err.value.field == "target"
    with pytest.raises(SchemaError) as err:
        Sample(key="x-1", record=rec, input_image=np.zeros((8, 8), np.uint8), target=np.zeros((64, 64), np.uint8))
    assert err.value.field == "target"
    with pytest.raises(SchemaError) as err:
        Sample(key="x-1", record=rec, input_image=np.zeros((8, 8), np.uint8), target_vq=np.zeros(1000, np.int16))
    assert err.value.field == "target.vq.npy"
    with pytest.raises(SchemaError):
        Sample(key="x-1", record=rec, input_image=np.zeros((8, 8), np.uint8), target_vq=np.full(1024, 8192))


def test_image_token_count_must_match_image():
    rec = Record(**record())
    with pytest.raises(SchemaError, match="no input image"):
        Sample(key="k", record=rec)
    two = Record(**record(conversations=[{"from": "human", "value": "<image><image>\nQ"}, {"from": "gpt", "value": "a"}]))
    with pytest.raises(SchemaError, match="exactly one"):
        Sample(key="k", record=two, input_image=np.zeros((4, 4), np.uint8))
    text_only = Record(**record(conversations=[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], answer_type="open"))
    assert Sample(key="k", record=text_only).input_format is None


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "sp ace", "é"])
def test_key_charset(key):
    with pytest.raises(SchemaError) as err:
        Sample(key=key, record=Record(**record()), input_image=np.zeros((4, 4), np.uint8))
    assert err.value.field == "key"


def test_safe_key():
    assert safe_key("vqa_rad", "synpic 100.jpg", 3) == "vqa_rad-synpic_100_jpg-3"


def test_members_round_trip_keeps_jpeg_bytes():
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    s = vqa_sample(1, image=None)
    s.input_image = jpeg
    members = s.to_members()
    assert members["input.jpg"] == jpeg and "input.png" not in members
    back = Sample.from_members(s.key, members)
    assert back.input_image == jpeg
    assert back.record == s.record
    g = generation_sample(2)
    g2 = Sample.from_members(g.key, g.to_members())
    assert np.array_equal(g2.target, g.target) and np.array_equal(g2.target_vq, g.target_vq)
    assert g2.target_vq.dtype == np.int16


def test_from_members_rejects_unknown_fields():
    s = vqa_sample(3)
    members = s.to_members()
    data = json.loads(members["json"])
    data["patient_name"] = "X"
    with pytest.raises(SchemaError) as err:
        Sample.from_members(s.key, {**members, "json": json.dumps(data).encode()})
    assert err.value.field == "patient_name"
