"""What `pip install .` puts into site-packages: our two packages and nothing generic."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installs_only_our_namespaces(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("vlhealth-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"healthgpt", "vlhealth"}, top
    assert "vlhealth/builders/synthrad.py" in names
    assert "vlhealth/manifest_files/vqa_rad.yaml" in names
    assert "healthgpt/training/configs/train_m3.yaml" in names
    assert "healthgpt/experiment/experiments/peft-variants.yaml" in names and "healthgpt/experiment/runner.py" in names
