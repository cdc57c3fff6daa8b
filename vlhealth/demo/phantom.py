"""Shared phantom anatomy for the demo data: label volumes, then CT / MR / X-ray renderings.

Anatomy is built as a **label volume** (one tissue class per voxel, the constants below) from
ellipsoids in *normalised anatomical coordinates* ``u = (x, y, z)`` in LPS directions (x to
the patient's left, y posterior, z superior), where ``u = ±1`` is the edge of the field of view.
A :class:`Pose` (per-axis scale, yaw/pitch, shift) varies shape, size and position per patient.

Every modality is rendered from the same labels with a **fixed tissue -> intensity table**
(``CT_HU``, ``MR_T1``, ``MR_T2``, ``MR_PD``, ``XRAY_MU``) plus partial-volume smoothing and,
for MR, a mild smooth multiplicative bias field and Rician noise. Because CT and MR of a patient
come from one label volume, CT <-> MR conversion is a learnable (context-dependent) mapping —
bone and air are both dark in MR, as in real data.

All randomness comes from the ``numpy.random.Generator`` passed in, so same seed -> same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# Tissue labels.
AIR, FAT, SOFT, WM, GM, CSF, BONE, FLUID, LESION, LUNG = range(10)
TISSUE_NAMES = ("air", "fat", "soft tissue", "white matter", "grey matter", "csf", "bone",
                "fluid", "lesion", "lung")

# Fixed tissue -> intensity tables (index = label).
CT_HU = np.array([-1000, -100, 45, 28, 38, 8, 1150, 5, 70, -850], dtype=np.float64)
MR_T1 = np.array([0, 1250, 520, 900, 620, 180, 70, 150, 360, 25], dtype=np.float64)
MR_T2 = np.array([0, 720, 380, 460, 660, 1600, 60, 1700, 1250, 25], dtype=np.float64)
MR_PD = np.array([0, 1000, 700, 760, 950, 1150, 90, 1150, 1050, 35], dtype=np.float64)
MR_TABLES = {"T1": MR_T1, "T2": MR_T2, "PD": MR_PD}
# Linear attenuation (1/mm, scaled for a small phantom) for the X-ray projection.
XRAY_MU = np.array([0.0, 0.017, 0.021, 0.021, 0.021, 0.02, 0.055, 0.02, 0.026, 0.004])


@dataclass(frozen=True)
class Pose:
    """Per-patient variation: anatomy scale per axis, rotation (deg) and shift (normalised)."""

    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    yaw: float = 0.0  # about z (in-plane rotation of axial slices)
    pitch: float = 0.0  # about x (nodding)
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Lesion:
    """A spherical lesion in normalised anatomical coordinates."""

    center: tuple[float, float, float]
    radius: float

    @property
    def side(self) -> str:
        """The patient side the lesion lies on (x > 0 is the patient's left in LPS)."""
        return "left" if self.center[0] > 0 else "right"


@dataclass
class Anatomy:
    """A label volume plus the facts questions can be asked about."""

    labels: np.ndarray  # (z, y, x) uint8
    region: str  # "head", "pelvis", "chest"
    lesions: list[Lesion] = field(default_factory=list)
    lesion_voxels: list[int] = field(default_factory=list)  # voxels painted per lesion


def random_pose(rng: np.random.Generator, scale_jitter: float = 0.08, yaw_deg: float = 10.0,
                pitch_deg: float = 4.0, shift: float = 0.04) -> Pose:
    """A random but plausible pose (sizes within ±scale_jitter, small rotations and shifts)."""
    s = 1.0 + rng.uniform(-scale_jitter, scale_jitter, size=3)
    return Pose(
        scale=(float(s[0]), float(s[1]), float(s[2])),
        yaw=float(rng.uniform(-yaw_deg, yaw_deg)),
        pitch=float(rng.uniform(-pitch_deg, pitch_deg)),
        shift=tuple(float(v) for v in rng.uniform(-shift, shift, size=3)),  # type: ignore[arg-type]
    )


def _grid(shape: Sequence[int], spacing: Sequence[float], pose: Pose, z_center: float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised anatomical coordinates (x, y, z) of every voxel of a (z, y, x) array.

    The in-plane field of view maps to [-1, 1]; z uses the same mm scale as the larger in-plane
    half extent, centred at ``z_center`` (so a single-slice array samples the anatomy there).
    """
    nz, ny, nx = (int(v) for v in shape)
    sz, sy, sx = (float(v) for v in spacing)
    half = max(nx * sx, ny * sy) / 2.0
    x = (np.arange(nx) - (nx - 1) / 2.0) * sx / half
    y = (np.arange(ny) - (ny - 1) / 2.0) * sy / half
    z = (np.arange(nz) - (nz - 1) / 2.0) * sz / half + z_center
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    # Undo the pose: shift, then rotation (pitch about x, yaw about z), then scale.
    px, py, pz = xx - pose.shift[0], yy - pose.shift[1], zz - pose.shift[2]
    cy, sy_ = np.cos(np.radians(pose.yaw)), np.sin(np.radians(pose.yaw))
    px, py = cy * px + sy_ * py, -sy_ * px + cy * py
    cp, sp = np.cos(np.radians(pose.pitch)), np.sin(np.radians(pose.pitch))
    py, pz = cp * py + sp * pz, -sp * py + cp * pz
    return px / pose.scale[0], py / pose.scale[1], pz / pose.scale[2]


def _inside(u: tuple[np.ndarray, np.ndarray, np.ndarray], center: Sequence[float],
            radii: Sequence[float]) -> np.ndarray:
    x, y, z = u
    return (((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
            + ((z - center[2]) / radii[2]) ** 2) <= 1.0


def _paint_lesions(labels: np.ndarray, u: tuple[np.ndarray, np.ndarray, np.ndarray],
                   lesions: Sequence[Lesion], within: Sequence[int]) -> list[int]:
    """Paint lesions into their host tissues; returns how many voxels each one got."""
    host = np.isin(labels, within)
    painted: list[int] = []
    for lesion in lesions:
        r = lesion.radius
        region = _inside(u, lesion.center, (r, r, r)) & host
        labels[region] = LESION
        painted.append(int(np.count_nonzero(region)))
    return painted


def head(shape: Sequence[int], spacing: Sequence[float], pose: Pose = Pose(),
         lesions: Sequence[Lesion] = (), z_center: float = 0.0) -> Anatomy:
    """Head: scalp, skull, grey and white matter, two lateral ventricles, a frontal sinus."""
    u = _grid(shape, spacing, pose, z_center)
    labels = np.zeros(tuple(int(v) for v in shape), dtype=np.uint8)
    labels[_inside(u, (0, 0, 0), (0.78, 0.92, 0.95))] = SOFT
    labels[_inside(u, (0, 0, 0), (0.74, 0.88, 0.91))] = BONE
    labels[_inside(u, (0, 0.01, 0), (0.68, 0.81, 0.84))] = GM
    labels[_inside(u, (0, 0.02, 0.02), (0.54, 0.66, 0.64))] = WM
    for side in (-1, 1):
        labels[_inside(u, (side * 0.12, -0.02, 0.1), (0.08, 0.26, 0.16))] = CSF
    labels[_inside(u, (0, -0.84, 0.2), (0.16, 0.05, 0.12))] = AIR  # frontal sinus
    painted = _paint_lesions(labels, u, lesions, (WM, GM))
    return Anatomy(labels, "head", list(lesions), painted)


def pelvis(shape: Sequence[int], spacing: Sequence[float], pose: Pose = Pose(),
           lesions: Sequence[Lesion] = (), z_center: float = 0.0, bladder_fill: float = 1.0) -> Anatomy:
    """Pelvis: fat, muscle, iliac wings, sacrum, femoral heads, bladder, rectum with gas."""
    u = _grid(shape, spacing, pose, z_center)
    labels = np.zeros(tuple(int(v) for v in shape), dtype=np.uint8)
    labels[_inside(u, (0, 0, 0), (0.94, 0.68, 50.0))] = FAT  # elliptic cylinder along z
    labels[_inside(u, (0, 0.02, 0), (0.84, 0.58, 50.0))] = SOFT
    for side in (-1, 1):
        labels[_inside(u, (side * 0.52, 0.12, 0.45), (0.16, 0.32, 0.5))] = BONE  # iliac wing
        labels[_inside(u, (side * 0.5, 0.02, -0.45), (0.15, 0.15, 0.16))] = BONE  # femoral head
    labels[_inside(u, (0, 0.46, 0.25), (0.16, 0.09, 0.7))] = BONE  # sacrum
    b = float(np.clip(bladder_fill, 0.4, 1.4))
    labels[_inside(u, (0, -0.24, -0.1), (0.2 * b, 0.18 * b, 0.28 * b))] = FLUID  # bladder
    labels[_inside(u, (0, 0.3, -0.1), (0.07, 0.06, 0.6))] = AIR  # rectal gas
    painted = _paint_lesions(labels, u, lesions, (SOFT,))
    return Anatomy(labels, "pelvis", list(lesions), painted)


def chest(shape: Sequence[int], spacing: Sequence[float], pose: Pose = Pose(),
          lesions: Sequence[Lesion] = (), z_center: float = 0.0) -> Anatomy:
    """Chest: body wall, two lungs, heart, spine and rib-like bands."""
    u = _grid(shape, spacing, pose, z_center)
    labels = np.zeros(tuple(int(v) for v in shape), dtype=np.uint8)
    labels[_inside(u, (0, 0, 0), (0.92, 0.62, 1.0))] = SOFT
    for side in (-1, 1):
        labels[_inside(u, (side * 0.42, 0.02, 0.08), (0.34, 0.46, 0.72))] = LUNG
    labels[_inside(u, (0.12, -0.14, -0.28), (0.3, 0.3, 0.34))] = SOFT  # heart
    labels[_inside(u, (0, 0.44, 0), (0.08, 0.08, 5.0))] = BONE  # spine
    x, y, z = u
    shell = _inside(u, (0, 0, 0), (0.86, 0.58, 0.95)) & ~_inside(u, (0, 0, 0), (0.8, 0.52, 0.95))
    labels[shell & (np.cos(z * 14.0) > 0.55)] = BONE  # ribs
    painted = _paint_lesions(labels, u, lesions, (LUNG,))
    return Anatomy(labels, "chest", list(lesions), painted)


REGIONS = {"head": head, "pelvis": pelvis, "chest": chest}
# Where lesions of each region may sit (normalised coordinates): centre ranges per axis.
_LESION_BOXES = {
    "head": ((0.2, 0.45), (-0.45, 0.45), (-0.25, 0.3)),
    "pelvis": ((0.25, 0.6), (-0.35, 0.2), (-0.4, 0.4)),
    "chest": ((0.3, 0.55), (-0.2, 0.25), (-0.3, 0.45)),
}


def random_lesions(rng: np.random.Generator, region: str, count: int, z: float | None = None,
                   radius: tuple[float, float] = (0.07, 0.12)) -> list[Lesion]:
    """``count`` lesions placed where ``region`` has host tissue; ``z`` pins their height."""
    xr, yr, zr = _LESION_BOXES[region]
    out: list[Lesion] = []
    for i in range(count):
        side = 1.0 if (i % 2 == 0) == bool(rng.integers(0, 2)) else -1.0
        center = (side * float(rng.uniform(*xr)), float(rng.uniform(*yr)),
                  float(rng.uniform(*zr)) if z is None else float(z))
        out.append(Lesion(center, float(rng.uniform(*radius))))
    return out


# ----------------------------------------------------------------------------------- rendering


def _smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return values
    sig = [0.0 if n == 1 else sigma for n in values.shape]
    return ndimage.gaussian_filter(values, sig, mode="nearest")


def render_ct(labels: np.ndarray, rng: np.random.Generator, noise_hu: float = 8.0,
              smooth: float = 0.6) -> np.ndarray:
    """CT in Hounsfield units, int16 (fixed HU per tissue, partial volume, Gaussian noise)."""
    hu = _smooth(CT_HU[labels], smooth) + rng.normal(0.0, noise_hu, size=labels.shape)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def bias_field(shape: Sequence[int], rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """A smooth multiplicative field around 1 (low-order polynomial, within about ±strength)."""
    axes = [np.linspace(-1, 1, int(n)) if int(n) > 1 else np.zeros(1) for n in shape]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    terms = (xx, yy, zz, xx * yy, xx**2 - 0.33, yy**2 - 0.33)
    coef = rng.normal(0.0, strength / 2.0, size=len(terms))
    log_field = sum((c * t for c, t in zip(coef, terms, strict=True)), np.zeros_like(xx))
    return np.exp(np.clip(log_field, -2 * strength, 2 * strength))


def render_mr(labels: np.ndarray, rng: np.random.Generator, contrast: str = "T1",
              bias: float = 0.1, noise: float = 0.015, smooth: float = 0.6,
              gain: float = 1.0) -> np.ndarray:
    """MR magnitude in scanner-like units, float32 (tissue table, bias field, Rician noise)."""
    table = MR_TABLES[contrast]
    signal = _smooth(table[labels], smooth) * bias_field(labels.shape, rng, bias) * gain
    sigma = noise * float(table.max()) * gain
    real = signal + rng.normal(0.0, sigma, size=labels.shape)
    imag = rng.normal(0.0, sigma, size=labels.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def body_mask(labels: np.ndarray, dilate: int = 2) -> np.ndarray:
    """The body outline (internal air filled, slice by slice), dilated in-plane; uint8 0/1."""
    mask = np.zeros(labels.shape, dtype=bool)
    for k in range(labels.shape[0]):
        mask[k] = ndimage.binary_fill_holes(labels[k] != AIR)
    if dilate > 0:
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1] = ndimage.generate_binary_structure(2, 1)
        mask = ndimage.binary_dilation(mask, structure, iterations=dilate)
    return mask.astype(np.uint8)


def xray_projection(labels: np.ndarray, spacing: Sequence[float], rng: np.random.Generator,
                    noise: float = 0.01) -> np.ndarray:
    """A frontal (AP) radiograph of a label volume, (z, x) with superior at the top, in [0, 1].

    Bright = attenuating (bone), as radiographs are displayed.
    """
    path = (XRAY_MU[labels] * float(spacing[1])).sum(axis=1)  # integrate along y (AP)
    image = 1.0 - np.exp(-path)
    image = image / max(float(image.max()), 1e-6)
    image = image + rng.normal(0.0, noise, size=image.shape)
    return np.clip(image[::-1], 0.0, 1.0)


def to_uint8(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Window ``image`` to [lo, hi] and scale to 0..255 (display images for 2D VQA sets)."""
    scaled = (np.clip(np.asarray(image, dtype=np.float64), lo, hi) - lo) / (hi - lo)
    return np.rint(scaled * 255.0).astype(np.uint8)


def histology_tile(rng: np.random.Generator, size: tuple[int, int], nuclei: int,
                   necrosis: bool = False) -> np.ndarray:
    """An H&E-like RGB tile (uint8): pink stroma with purple nuclei, optionally a pale necrotic area."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.empty((h, w, 3), dtype=np.float64)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, size=(h, w)), 3.0)
    texture = texture / max(float(np.abs(texture).max()), 1e-6)
    base[..., 0] = 232 + 14 * texture
    base[..., 1] = 170 + 22 * texture
    base[..., 2] = 200 + 12 * texture
    if necrosis:
        cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, 0.22 * min(h, w)
        pale = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r**2
        base[pale] = base[pale] * 0.4 + np.array([245.0, 225.0, 235.0]) * 0.6
    for _ in range(nuclei):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(2.0, 4.5), rng.uniform(2.0, 4.5)
        blob = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0
        base[blob] = np.array([92.0, 52.0, 130.0]) + rng.normal(0, 8, size=3)
    return np.clip(np.rint(base), 0, 255).astype(np.uint8)


def stored_orientation(
    array: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    axes: tuple[int, int, int] = (0, 1, 2),
    flip: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float], np.ndarray]:
    """Re-store a canonical (LPS, identity direction) volume with another voxel-axis layout.

    ``axes[t]`` is the canonical physical axis (0 = x/L, 1 = y/P, 2 = z/S) that stored ITK index
    axis ``t`` (i, j, k) runs along, and ``flip[t]`` reverses it. The physical content is unchanged,
    so reading the result with :func:`vlhealth.volumes.read_volume` gives ``array`` back — the
    demo uses it to write realistic, non-canonical files (e.g. sagittal or RAS-stored NIfTI).
    Returns ``(array, spacing, origin, direction)`` in :func:`vlhealth.volumes.write_volume` terms.
    """
    if sorted(axes) != [0, 1, 2]:
        raise ValueError(f"axes must be a permutation of (0, 1, 2), got {axes}")
    canon_spacing_xyz = tuple(float(s) for s in reversed(tuple(spacing)))
    canon_size_xyz = tuple(int(n) for n in reversed(array.shape))
    stored = np.transpose(array, [2 - axes[2], 2 - axes[1], 2 - axes[0]])
    for t in range(3):
        if flip[t]:
            stored = np.flip(stored, axis=2 - t)
    direction = np.zeros((3, 3))
    corner = np.asarray(origin, dtype=np.float64).copy()
    for t, a in enumerate(axes):
        direction[a, t] = -1.0 if flip[t] else 1.0
        if flip[t]:
            corner[a] += (canon_size_xyz[a] - 1) * canon_spacing_xyz[a]
    stored_spacing_zyx = tuple(canon_spacing_xyz[axes[t]] for t in (2, 1, 0))
    return (np.ascontiguousarray(stored), stored_spacing_zyx,  # type: ignore[return-value]
            tuple(float(v) for v in corner), direction)  # type: ignore[return-value]


# Display windows (level, width) for 2D renderings.
_CT_DISPLAY = {"head": (40.0, 120.0), "pelvis": (50.0, 250.0), "chest": (-500.0, 1500.0)}

SCAN_KINDS = ("ct_head", "mr_head", "ct_pelvis", "xray_chest")


@dataclass
class Scan2D:
    """A 2D display image (uint8) rendered from a phantom, with the facts behind it."""

    image: np.ndarray
    kind: str  # one of SCAN_KINDS
    modality: str  # "CT", "MRI", "X-ray"
    region: str  # "head", "pelvis", "chest"
    plane: str  # "axial" or "coronal" (radiographs: frontal projection, reported as coronal)
    lesions: list[Lesion]


def scan_2d(rng: np.random.Generator, kind: str, n_lesions: int, size: tuple[int, int]) -> Scan2D:
    """One axial CT/MR slice or a frontal chest radiograph, ``size`` = (rows, cols).

    Lesions are placed in the imaged plane so that "is there a lesion" / "how many" / "which
    side" questions are answerable from the pixels. Axial images are in radiological display
    (patient's left on the image's right), as :func:`vlhealth.volumes.slice_volume` gives them.
    """
    if kind not in SCAN_KINDS:
        raise ValueError(f"kind must be one of {SCAN_KINDS}, got {kind!r}")
    rows, cols = size
    # Redraw until every lesion is clearly visible and separate, so that the answers
    # ("is there a lesion", "how many", "which side") are true of the pixels.
    for _ in range(50):
        scan, anat = _draw_scan(rng, kind, n_lesions, rows, cols)
        if _lesions_ok(anat, min_voxels=12 if kind == "xray_chest" else 40):
            return scan
    raise RuntimeError(f"could not place {n_lesions} visible lesions in a {kind} image")


def _lesions_ok(anat: Anatomy, min_voxels: int) -> bool:
    if any(n < min_voxels for n in anat.lesion_voxels):
        return False
    for i, a in enumerate(anat.lesions):
        for b in anat.lesions[i + 1:]:
            gap = float(np.linalg.norm(np.subtract(a.center, b.center)))
            if gap < a.radius + b.radius + 0.08:
                return False
    return True


def _draw_scan(rng: np.random.Generator, kind: str, n_lesions: int, rows: int, cols: int
               ) -> tuple[Scan2D, Anatomy]:
    pose = random_pose(rng, pitch_deg=0.0)
    if kind == "xray_chest":
        lesions = random_lesions(rng, "chest", n_lesions, radius=(0.08, 0.12))
        spacing = (4.0, 4.0, 4.0)
        anat = chest((rows // 2, 24, cols // 2), spacing, pose, lesions)
        proj = xray_projection(anat.labels, spacing, rng)
        from skimage.transform import resize

        image = resize(proj, (rows, cols), order=1, mode="edge", anti_aliasing=False)
        return Scan2D(to_uint8(image, 0.0, 1.0), kind, "X-ray", "chest", "coronal", lesions), anat
    region = "head" if kind.endswith("head") else "pelvis"
    z = float(rng.uniform(-0.05, 0.15))
    lesions = random_lesions(rng, region, n_lesions, z=z)
    build = head if region == "head" else pelvis
    anat = build((1, rows, cols), (1.0, 1.0, 1.0), pose, lesions, z_center=z)
    if kind.startswith("ct"):
        level, width = _CT_DISPLAY[region]
        hu = render_ct(anat.labels, rng)[0]
        image = to_uint8(hu, level - width / 2, level + width / 2)
        modality = "CT"
    else:
        mr = render_mr(anat.labels, rng, "T2")[0]
        image = to_uint8(mr, 0.0, float(np.percentile(mr, 99.5)))
        modality = "MRI"
    return Scan2D(image, kind, modality, region, "axial", lesions), anat
