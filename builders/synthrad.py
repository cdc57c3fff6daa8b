"""SynthRAD2023 Task 1 (brain and pelvis MR/CT pairs) -> CT<->MRI conversion and reconstruction.

Layout (as released): ``Task1/{brain,pelvis}/<ID>/{ct,mr,mask}.nii.gz`` (the root may be the
folder holding ``Task1/`` or ``Task1/`` itself). Per patient, every axial slice whose body-mask
coverage reaches ``--min-coverage`` (for val/test patients every slice that touches the body,
``--eval-slices body``, so that whole volumes can be scored) gives

* ``ct2mri``  input the CT slice (modality CT) -> target the MR slice,
* ``mri2ct``  input the MR slice (modality MR) -> target the CT slice,
* ``recon``   input a slice -> the same slice (``--recon mr|ct|both|none``, default both),

with body_part ``brain`` or ``pelvis``. CT uses the [-1024, 3000] HU window, MR the 0.5-99.5
percentile window of the voxels inside the mask (one window per volume). Outside the body mask
both are set to the window's low end (``--no-mask-background`` keeps the couch and air).
Slices are resampled to square pixels when the in-plane spacing differs
(:func:`vlhealth.volumes.slice_volume`) and fitted to 256x256 (physical aspect kept, padded); input
and target are pixel-aligned.

Members of every sample, in every split (one member set per folder, which the Hugging Face
``datasets`` WebDataset loader requires):

* ``input.png``     8-bit input slice, 256x256;
* ``target.png``    8-bit target slice, 256x256 (``round(reference / 257)``);
* ``target.vq.npy`` its 1024 VQ indices;
* ``reference.png`` the target slice at 16 bits, 256x256: ``value = lo + v / 65535 * (hi - lo)``
  with ``[lo, hi]`` = ``provenance.target_window`` (CT: HU in [-1024, 3000], so HU metrics —
  masked MAE/PSNR/SSIM — are computed from it; MR: scanner units of the percentile window);
* ``mask.png``      the body mask on the same 256x256 grid, 0/255.

``provenance.grid`` (:func:`vlhealth.reassemble.slice_grid`) records the canonical volume's shape,
spacing, origin and direction and where each slice went (square-pixel shape, box in the 256x256
image), and ``provenance.source_sha256`` the SHA-256 of ct/mr/mask (``--no-source-checksums`` skips
it): ``healthgpt eval-volumes`` puts generated slices back on the source grid with the first and
checks it scores against the very source volumes with the second.

Pairs must share one geometry; with ``--register`` the MR is registered to the CT (centred
rigid then affine, Mattes MI, multi-resolution; :mod:`vlhealth.registration`), resampled on the
CT grid, a before/after figure is written to ``<out>/registration/<ID>.png`` and the numbers go to
build.json (``items.<item>.registration``). Without it, a geometry mismatch refuses the patient.
The registration runs on ``--register-threads`` ITK threads (default 1), which keeps registered
builds byte-identical run to run; more threads can shorten one registration on a many-core machine
but make the output not reproducible (the Mattes metric's sums follow the thread schedule). Use
``--workers`` to register patients in parallel.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlhealth.build import BuildContext, Item, ItemReport, Reject, Rejected
from vlhealth.reassemble import file_sha256, slice_grid
from vlhealth.schema import IMAGE_POSITIONS, Record, Sample, encode_png, image_turn
from vlhealth.volumes import (
    Volume,
    apply_window,
    ct_window,
    fit_square,
    mr_window,
    read_volume,
    same_geometry,
    slice_volume,
)

NAME = "synthrad2023"
MANIFEST = "synthrad2023"
GENERATES = True
EXAMPLE = "vlhealth build synthrad /data/SynthRAD2023 --out shards/synthrad --workers 4"

ANATOMIES = ("brain", "pelvis")
FILES = ("ct", "mr", "mask")
SIZE = 256


@dataclass
class Options:
    min_coverage: float = field(default=0.15, metadata={
        "help": "Keep axial slices whose body mask covers at least this fraction of the slice."})
    slice_step: int = field(default=1, metadata={"help": "Use every n-th kept slice."})
    eval_slices: str = field(default="body", metadata={
        "help": "Slices of val/test patients: 'body' writes every slice that touches the body mask (so "
                "`healthgpt eval-volumes` scores whole volumes, as the challenge does); 'same' applies "
                "--min-coverage and --slice-step as for training."})
    recon: str = field(default="both", metadata={
        "help": "Reconstruction samples from the mr, ct, both or none of the slices."})
    register: bool = field(default=False, metadata={
        "help": "Register MR to CT (rigid then affine, Mattes MI) instead of requiring identical geometry."})
    register_threads: int = field(default=1, metadata={
        "help": "ITK threads per registration (with --register). 1 keeps the output byte-identical run to run; "
                "with N > 1 (or 0: ITK's default, all cores) the output is NOT reproducible, because the "
                "metric's sums follow the thread schedule. For speed, register patients in parallel with "
                "--workers instead."})
    mask_background: bool = field(default=True, metadata={
        "help": "Set voxels outside the body mask to the window's low end."})
    anatomy: str = field(default="brain,pelvis", metadata={"help": "Comma-separated anatomies to build."})
    image_position: str = field(default="first", metadata={
        "help": "Where the input image goes in the instruction: 'first' ('<image>\\n' + instruction, as LLaVA and "
                "the released HealthGPT prompts) or 'last' (instruction + '\\n<image>': the image right before the "
                "answer, so each output code sits the same number of positions after its input patch whatever "
                "the instruction's length; a small model learns that alignment far sooner)."})
    source_checksums: bool = field(default=True, metadata={
        "help": "Record the SHA-256 of ct/mr/mask in provenance, so `healthgpt eval-volumes --source-root` "
                "can check it scores against the very volumes the slices came from."})


SOURCE_SUFFIXES = (".nii.gz", ".nii", ".mha")


def _task_root(root: Path) -> Path:
    return root / "Task1" if (root / "Task1").is_dir() else root


def source_volume(patient: Path, name: str) -> Path | None:
    """``<patient>/<name>.nii.gz`` (or ``.nii``, ``.mha``), whichever the release holds; None when absent."""
    return next((patient / f"{name}{suf}" for suf in SOURCE_SUFFIXES if (patient / f"{name}{suf}").is_file()), None)


def find_patient(root: Path, patient: str) -> tuple[str, Path] | None:
    """(anatomy, folder) of a patient id in a release (``Task1/{brain,pelvis}/<ID>``), or None. Also what
    ``healthgpt eval-volumes --from-files`` without shards scores against."""
    task = _task_root(Path(root))
    return next(((a, task / a / patient) for a in ANATOMIES if (task / a / patient).is_dir()), None)


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    task = _task_root(ctx.root)
    wanted = [a.strip() for a in ctx.options.anatomy.split(",") if a.strip()]
    bad = [a for a in wanted if a not in ANATOMIES]
    if bad:
        raise ValueError(f"--anatomy: unknown {bad}; choose from {list(ANATOMIES)}")
    if ctx.options.image_position not in IMAGE_POSITIONS:
        raise ValueError(f"--image-position must be one of {IMAGE_POSITIONS}, got {ctx.options.image_position!r}")
    if ctx.options.eval_slices not in ("body", "same"):
        raise ValueError(f"--eval-slices must be body or same, got {ctx.options.eval_slices!r}")
    if ctx.options.recon not in ("mr", "ct", "both", "none"):
        raise ValueError(f"--recon must be mr, ct, both or none, got {ctx.options.recon!r}")
    if ctx.options.register_threads < 0:
        raise ValueError(f"--register-threads must be >= 0 (0: ITK's default), got {ctx.options.register_threads}")
    for anatomy in wanted:
        folder = task / anatomy
        if not folder.is_dir():
            continue
        for patient in sorted(p for p in folder.iterdir() if p.is_dir()):
            paths = {}
            missing = []
            for name in FILES:
                found = source_volume(patient, name)
                if found is not None:
                    paths[name] = found
                else:
                    missing.append(name)
            item_id = f"{anatomy}-{patient.name}"
            if missing:
                yield Reject(ctx.rel(patient / f"{missing[0]}.nii.gz"),
                             f"missing {' and '.join(m + '.nii.gz' for m in missing)} for patient {patient.name}",
                             item_id)
                continue
            yield Item(id=item_id, group=patient.name, files=tuple(ctx.rel(paths[n]) for n in FILES),
                       data={"anatomy": anatomy, "patient": patient.name})


def split_strata(items: Iterable[Item]) -> dict[str, str]:
    return {it.group: it.data["anatomy"] for it in items}


def _geometry_problem(ct: Volume, other: Volume, what: str) -> str | None:
    if ct.shape != other.shape:
        return f"CT/{what} shape mismatch: CT {ct.shape} vs {what} {other.shape} (z, y, x)"
    if not np.allclose(ct.spacing, other.spacing, atol=1e-3):
        return (f"CT/{what} spacing mismatch: CT {tuple(round(s, 4) for s in ct.spacing)} vs "
                f"{what} {tuple(round(s, 4) for s in other.spacing)} mm")
    if not same_geometry(ct, other):
        return f"CT/{what} origin or direction mismatch (same shape and spacing)"
    return None


def _fit16(slice2d: np.ndarray) -> np.ndarray:
    return fit_square(slice2d, SIZE, order=1, pad_value=0)


def process(item: Item, ctx: BuildContext) -> Iterator[Sample | ItemReport]:
    opts: Options = ctx.options
    ct_file, mr_file, mask_file = item.files
    anatomy, patient = item.data["anatomy"], item.data["patient"]
    ct = read_volume(ctx.root / ct_file, root=ctx.root)
    mr = read_volume(ctx.root / mr_file, root=ctx.root)
    mask_vol = read_volume(ctx.root / mask_file, root=ctx.root, allow_empty=True)
    problem = _geometry_problem(ct, mask_vol, "mask")
    if problem:
        raise Rejected(mask_file, problem)
    mask = mask_vol.array > 0
    if not mask.any():
        raise Rejected(mask_file, "empty body mask (no voxel > 0)")
    registered = False
    problem = _geometry_problem(ct, mr, "MR")
    if opts.register:
        from vlhealth.registration import register_mr_to_ct, resample_to, similarity_figure

        reg = register_mr_to_ct(ct, mr, mask=mask, threads=opts.register_threads)
        before_nmi, after_nmi = reg.before.get("nmi"), reg.after.get("nmi")
        if before_nmi is not None and not (after_nmi is not None and after_nmi >= before_nmi):
            raise Rejected(mr_file, f"registration made the MR/CT similarity worse (NMI {before_nmi:.3f} -> "
                                    f"{after_nmi}); check this pair by eye or register it yourself")
        report = reg.summary()
        if ctx.out is not None:
            fig = similarity_figure(ct, resample_to(mr, ct, threads=opts.register_threads), reg.moved,
                                    ctx.out / "registration" / f"{patient}.png",
                                    title=f"{patient} MR -> CT", before=reg.before, after=reg.after)
            report["figure"] = fig.relative_to(ctx.out).as_posix()
        yield ItemReport({"registration": report})
        mr, registered = reg.moved, True
    elif problem:
        raise Rejected(mr_file, problem)

    ctw = ct_window()
    try:
        mrw = mr_window(mr.array, mask)
    except ValueError as exc:
        raise Rejected(mr_file, f"MR window: {exc}") from exc
    coverage = mask.reshape(mask.shape[0], -1).mean(axis=1)
    split = ctx.split_of(item.group)
    if split != "train" and opts.eval_slices == "body":  # held out: the whole body, as the challenge scores it
        kept = [int(k) for k in np.flatnonzero(coverage > 0)]
    else:
        kept = [int(k) for k in np.flatnonzero(coverage >= opts.min_coverage)][:: max(1, opts.slice_step)]
    if not kept:
        raise Rejected(mask_file, f"no axial slice has body-mask coverage >= {opts.min_coverage}")
    windows = {"CT": ctw.as_dict(), "MR": mrw.as_dict()}
    files = {"ct": ct_file, "mr": mr_file, "mask": mask_file}
    # what `healthgpt eval-volumes` needs to put predictions back on the source grid and find the source
    grid = slice_grid(ct, "axial", SIZE)
    checksums = {name: file_sha256(ctx.root / f) for name, f in files.items()} if opts.source_checksums else None
    body = Volume(mask.view(np.uint8), ct.spacing, ct.origin, ct.direction, mask_vol.source)
    for k in kept:
        # windowed slice by slice, only the kept ones (a whole float64 volume costs more than reading it);
        # slice_volume resamples non-square in-plane pixels to square ones (a copy of the slice otherwise)
        ct_k, mr_k = slice_volume(ct, "axial", k)[0], slice_volume(mr, "axial", k)[0]
        mask_k = slice_volume(body, "axial", k, mask=True)[0] > 0
        ct16, mr16 = apply_window(ct_k, ctw, np.uint16), apply_window(mr_k, mrw, np.uint16)
        if opts.mask_background:
            ct16[~mask_k] = 0
            mr16[~mask_k] = 0
        images = {"CT": _fit16(ct16), "MR": _fit16(mr16)}
        mask256 = fit_square(mask_k.astype(np.uint8) * 255, SIZE, order=0, pad_value=0)
        if opts.mask_background:  # the resize blurs the body edge: keep outside == background exactly
            for a in images.values():
                a[mask256 == 0] = 0
        eight = {m: np.rint(a / 257.0).astype(np.uint8) for m, a in images.items()}
        mask_png = encode_png(mask256)
        refs = {m: encode_png(a) for m, a in images.items()}
        pairs = [("ct2mri", "CT", "MR"), ("mri2ct", "MR", "CT")]
        if opts.recon in ("mr", "both"):
            pairs.append(("recon", "MR", "MR"))
        if opts.recon in ("ct", "both"):
            pairs.append(("recon", "CT", "CT"))
        for subtask, src, dst in pairs:
            tag = subtask if subtask != "recon" else f"recon_{src.lower()}"
            key = f"{NAME}-{patient}-{tag}-{k:04d}"
            prompt = ctx.template(subtask, key)
            record = Record(
                task="generation", subtask=subtask, source=NAME, split=split,
                conversations=[{"from": "human", "value": image_turn(prompt, opts.image_position)},
                               {"from": "gpt", "value": "<target_image>"}],
                group=item.group, license=ctx.license, modality=src, body_part=anatomy,
                provenance={
                    "files": files, "axis": "axial", "slice": k, "n_slices": int(ct.shape[0]),
                    "mask_coverage": round(float(coverage[k]), 4),
                    "input_modality": src, "target_modality": dst,
                    "input_window": windows[src], "target_window": windows[dst],
                    "reference": {"member": "reference.png", "dtype": "uint16", "modality": dst,
                                  "mask_member": "mask.png",
                                  "decode": "value = lo + v / 65535 * (hi - lo) with target_window"},
                    "registered": registered,
                    "mask_background": opts.mask_background,
                    "grid": grid,
                    **({"source_sha256": checksums} if checksums else {}),
                },
                extra={"center": patient[2] if len(patient) > 2 else None},
            )
            yield Sample(key=key, record=record, input_image=eight[src], target=eight[dst],
                         extras={"reference.png": refs[dst], "mask.png": mask_png})
