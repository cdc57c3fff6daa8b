"""SynthRAD2023 Task 1 (MR -> CT) layout: ``Task1/{brain,pelvis}/<ID>/{ct,mr,mask}.nii.gz``.

Patient IDs follow the real scheme ``1`` (task) + ``B``/``P`` (brain/pelvis) + centre letter
``A``/``B``/``C`` + a three-digit number (``1BA001``, ``1PC003``). Per patient the three files
share one geometry (MR registered to CT, as released): CT int16 HU, MR in scanner-like units
(brain float32, pelvis uint16), body mask uint8. One pelvis patient is stored RAS-flipped to
exercise reorientation. The ``overview/`` spreadsheets of the release are not reproduced.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from vlhealth.demo import phantom
from vlhealth.volumes import write_volume

NAME = "synthrad2023"

# anatomy -> (patient IDs, base shape (z, y, x), spacing (z, y, x) mm)
PATIENTS = {
    "brain": (("1BA001", "1BA002", "1BB003", "1BC004"), (36, 64, 56), (6.0, 3.5, 3.5)),
    "pelvis": (("1PA001", "1PB002", "1PC003"), (28, 48, 72), (7.5, 5.0, 5.0)),
}
RAS_STORED = {"1PB002"}  # written with x and y flipped (as some converters store NIfTI)


def _extra_ids(anatomy: str, count: int, start: int) -> tuple[str, ...]:
    """More IDs in the release's scheme (centres A/B/C in turn), numbered after the fixed ones."""
    letter = "B" if anatomy == "brain" else "P"
    return tuple(f"1{letter}{'ABC'[i % 3]}{start + i:03d}" for i in range(count))


def write(root: Path, rng: np.random.Generator, scale: int = 1) -> None:
    _write_patients(root, rng, {a: (ids, shape, sp) for a, (ids, shape, sp) in PATIENTS.items()})
    if scale > 1:  # drawn after the fixed patients, from a generator of its own: those stay byte-identical
        extra = np.random.default_rng(int(rng.integers(2**62)))
        _write_patients(root, extra, {a: (_extra_ids(a, (scale - 1) * len(ids), len(ids) + 1), shape, sp)
                                      for a, (ids, shape, sp) in PATIENTS.items()}, varied=True)


def _write_patients(root: Path, rng: np.random.Generator,
                    patients: dict[str, tuple[tuple[str, ...], tuple[int, int, int], tuple[float, float, float]]],
                    varied: bool = False) -> None:
    """``varied``: wider poses and a few lesions per patient, so that phantom patients built from one
    anatomy template are not near-duplicates of each other (the leak check compares train and test slices)."""
    for anatomy, (ids, base_shape, spacing) in patients.items():
        for pid in ids:
            shape = (
                base_shape[0] + int(rng.integers(-2, 3)),
                base_shape[1] + 2 * int(rng.integers(-2, 3)),
                base_shape[2] + 2 * int(rng.integers(-2, 3)),
            )
            if varied:
                # turned 12-35 degrees either way: never as upright as the fixed patients' +-10 degrees
                yaw = float(rng.choice([-1.0, 1.0]) * rng.uniform(12.0, 35.0))
                pose = replace(phantom.random_pose(rng, scale_jitter=0.3, pitch_deg=8.0, shift=0.12), yaw=yaw)
                region = "head" if anatomy == "brain" else "pelvis"
                lesions = phantom.random_lesions(rng, region, int(rng.integers(1, 4)), radius=(0.08, 0.16))
            else:
                pose, lesions = phantom.random_pose(rng), []
            if anatomy == "brain":
                anat = phantom.head(shape, spacing, pose, lesions)
            else:
                anat = phantom.pelvis(shape, spacing, pose, lesions, bladder_fill=float(rng.uniform(0.6, 1.3)))
            ct = phantom.render_ct(anat.labels, rng)
            gain = float(rng.uniform(0.8, 1.25))  # scanner-to-scanner scale differences
            mr = phantom.render_mr(anat.labels, rng, "T1", gain=gain)
            mr_out = mr if anatomy == "brain" else np.clip(np.rint(mr), 0, 65535).astype(np.uint16)
            mask = phantom.body_mask(anat.labels)
            origin = (
                -shape[2] * spacing[2] / 2.0 + float(rng.uniform(-5, 5)),
                -shape[1] * spacing[1] / 2.0 + float(rng.uniform(-5, 5)),
                float(rng.uniform(-80, 20)),
            )
            folder = root / "Task1" / anatomy / pid
            for fname, arr in (("ct", ct), ("mr", mr_out), ("mask", mask)):
                if pid in RAS_STORED:
                    data, sp, org, direction = phantom.stored_orientation(
                        arr, spacing, origin, (0, 1, 2), (True, True, False)
                    )
                else:
                    data, sp, org, direction = arr, spacing, origin, np.eye(3)
                write_volume(data, folder / f"{fname}.nii.gz", sp, org, direction)
