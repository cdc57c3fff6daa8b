"""Deterministic synthetic replicas of the upstream dataset layouts (``vlhealth demo-data OUT``).

Each upstream source has one module in this package that writes a small, phantom-based copy
of the source's *real on-disk layout* (file names, folder structure, annotation formats), so
builders can be developed and tested without the real data. :func:`write_demo_data` writes
the chosen sources under ``OUT/<NAME>/`` and returns ``{NAME: root}``.

Adding a layout (e.g. MIMIC-CXR, LLaVA-Med, OmniMedVQA) takes two steps:

1. Create ``vlhealth/demo/<module>.py`` exposing

   * ``NAME: str`` — the source name (the folder under OUT; use the builder/manifest name),
   * ``write(root: Path, rng: numpy.random.Generator) -> None`` — write the layout under
     ``root`` (the folder exists and is empty) using only ``rng`` for randomness. A module may
     also accept ``scale: int`` (more patients/images, drawn after the ``scale = 1`` ones). Reuse
     :mod:`vlhealth.demo.phantom` for images/volumes (``scan_2d``, ``head``, ``render_ct`` ...),
     :mod:`vlhealth.demo._io` for byte-deterministic JSON/JPEG/PNG and
     :func:`vlhealth.volumes.write_volume` for volumes (deterministic ``.nii.gz``).

2. Append ``"<module>"`` to :data:`MODULES` below.

Determinism: every source draws from its own generator seeded by ``(seed, crc32(NAME))``, so
adding, removing or reordering sources never changes the bytes of the others, and the same
seed always gives byte-identical files (no timestamps in gzip, JPEG, PNG, pickle or xls). Each
source is written to a temporary sibling folder and swapped in at the end, so a rerun replaces
a previous copy completely and an interrupted run leaves no half-written source.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np

# Module names (in this package) of the registered layouts, in writing order.
MODULES: tuple[str, ...] = ("synthrad", "ixi", "vqa_rad", "slake", "pathvqa",
                           "mimic_cxr_vqa", "llava_med", "pubmedvision", "llava_instruct", "omnimedvqa",
                           "mimic_cxr", "llava_pretrain")


def registry() -> dict[str, ModuleType]:
    """``{NAME: module}`` for every registered layout module."""
    out: dict[str, ModuleType] = {}
    for module_name in MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        name = getattr(module, "NAME", None)
        if not isinstance(name, str) or not callable(getattr(module, "write", None)):
            raise TypeError(f"{module.__name__} must define NAME: str and write(root, rng)")
        if name in out:
            raise ValueError(f"duplicate demo source name {name!r} ({module.__name__})")
        out[name] = module
    return out


def source_names() -> list[str]:
    """Names of the sources :func:`write_demo_data` can write."""
    return list(registry())


def source_rng(name: str, seed: int) -> np.random.Generator:
    """The generator a source gets: independent of the other sources, fixed by (seed, name)."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def write_demo_data(out: Path, sources: list[str] | None = None, seed: int = 0, scale: int = 1,
                    scales: Mapping[str, int] | None = None) -> dict[str, Path]:
    """Write the demo layouts under ``out/<NAME>/``; returns ``{NAME: root folder}``.

    ``sources`` picks a subset by NAME (default: all, in registry order). Unknown names raise
    ``ValueError`` listing the known ones. ``scale`` > 1 makes the sources whose ``write`` takes a
    ``scale`` argument (SynthRAD2023, VQA-RAD, SLAKE) about ``scale`` times larger — enough patients
    and images for the demo's tasks to be learnable; their first ``scale = 1`` files stay byte-identical.
    ``scales`` overrides ``scale`` per source NAME (``{"vqa_rad": 30}``); a source there must take a scale.
    """
    modules = registry()
    per_source = dict(scales or {})
    for name, k in [("all sources", scale), *per_source.items()]:
        if int(k) < 1:
            raise ValueError(f"scale must be >= 1, got {k} for {name}")
    wrong = [n for n in per_source if n not in modules or "scale" not in inspect.signature(modules[n].write).parameters]
    if wrong:
        scalable = [n for n, m in modules.items() if "scale" in inspect.signature(m.write).parameters]
        raise ValueError(f"no per-source scale for {wrong}; sources that take one: {scalable}")
    chosen = list(modules) if sources is None else list(dict.fromkeys(sources))
    unknown = [s for s in chosen if s not in modules]
    if unknown:
        raise ValueError(f"unknown demo source(s) {unknown}; known: {list(modules)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name in chosen:
        final = out / name
        tmp = out / f".{name}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write = modules[name].write
        k = int(per_source.get(name, scale))
        if k > 1 and "scale" in inspect.signature(write).parameters:
            write(tmp, source_rng(name, seed), scale=k)
        else:
            write(tmp, source_rng(name, seed))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        written[name] = final
    return written


__all__ = ["MODULES", "registry", "source_names", "source_rng", "write_demo_data"]
