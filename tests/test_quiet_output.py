"""A quiet terminal: `infer` (and so `eval` and `serve`, which decode through the same code) prints no
third-party deprecation output, and no message carries a memory address."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from healthgpt.serving.errors import ApiError
from healthgpt.serving.images import decode_image_bytes
from vlhealth.cli_errors import error_line


def test_no_memory_address_in_messages() -> None:
    try:
        decode_image_bytes(b"not an image at all", param="image", max_bytes=1000)
    except ApiError as err:
        assert "0x" not in str(err) and "invalid_image" == err.code
    else:
        raise AssertionError("undecodable bytes were accepted")
    assert "0x" not in error_line(ValueError("cannot identify image file <_io.BytesIO object at 0x7f12ab34cd56>"))


def test_infer_prints_no_deprecation_output(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("L", (48, 48), 100).save(tmp_path / "scan.png")
    result = subprocess.run(
        [sys.executable, "-W", "default", "-m", "healthgpt.cli", "infer", "--preset", "tiny", "--image",
         str(tmp_path / "scan.png"), "--question", "Is there a lesion?", "--max-new-tokens", "6", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    for noise in ("FutureWarning", "DeprecationWarning", "deprecated", " at 0x"):
        assert noise not in out, out
