"""Physical resolution (microns per pixel at level 0) from a slide's own metadata, with its source.

Pixel backends do not agree on resolution: cuCIM's ``spacing()`` says 1.0 for an Aperio file whose
header says ``MPP = 0.4990``, and generic TIFF writers often leave 72 dpi in the resolution tags (which
reads as ~352.8 um/px). So the value is taken from the vendor metadata itself, in this order:

1. a value the user gives (the datalist ``mpp`` column),
2. the Aperio ImageDescription ``MPP = ...``,
3. OME-XML ``PhysicalSizeX`` (with its unit),
4. TIFF ``XResolution`` with ``ResolutionUnit`` (inch or centimetre; "none" is not a physical unit),
5. OpenSlide's ``openslide.mpp-x`` (covers formats that are not TIFF-based),
6. DICOM ``PixelSpacing`` (millimetres),
7. a default the user passed on purpose (``default_mpp``).

Values outside 0.05-20 um/px are rejected and listed in the error. No source at all is an error that
names the slide and the fix; 1.0 is never assumed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
import tifffile

from scripts.utils.errors import BundleError
from scripts.wsi.filekind import file_kind

MPP_RANGE = (0.05, 20.0)  # the same plausibility range the datalist uses

_APERIO_MPP = re.compile(r"(?:^|\|)\s*MPP\s*=\s*([0-9.eE+-]+)")
_OME_SIZE = re.compile(r'PhysicalSizeX="([0-9.eE+-]+)"')
_OME_UNIT = re.compile(r'PhysicalSizeXUnit="([^"]+)"')
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


class MppError(BundleError, ValueError):
    """No usable microns-per-pixel for a slide; the message names the slide and the fix."""


@dataclass(frozen=True)
class MppCandidate:
    value: float
    source: str

    @property
    def plausible(self) -> bool:
        return is_plausible(self.value)


def is_plausible(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1]


def candidates_from_tiff(path: str | Path) -> list[MppCandidate]:
    """Resolution candidates in a TIFF's first page: Aperio description, OME-XML, resolution tags."""
    found: list[MppCandidate] = []
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        description = page.description or ""
        match = _APERIO_MPP.search(description)
        if match and description.startswith("Aperio"):
            found.append(MppCandidate(float(match.group(1)), "aperio ImageDescription MPP"))
        if "<OME" in description:
            size = _OME_SIZE.search(description)
            if size:
                unit = _OME_UNIT.search(description)
                factor = _OME_UNITS_UM.get(unit.group(1) if unit else "µm")
                if factor is not None:
                    found.append(MppCandidate(float(size.group(1)) * factor, "OME-XML PhysicalSizeX"))
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            per_unit = num / den if den else 0.0
            if per_unit > 0 and unit in (2, 3):
                microns = 25400.0 if unit == 2 else 10000.0
                name = "inch" if unit == 2 else "centimeter"
                found.append(MppCandidate(microns / per_unit, f"TIFF XResolution ({per_unit:g} px per {name})"))
    return found


def candidates_from_openslide(properties) -> list[MppCandidate]:
    value = properties.get("openslide.mpp-x") if properties is not None else None
    if value in (None, ""):
        return []
    try:
        return [MppCandidate(float(value), "OpenSlide openslide.mpp-x")]
    except ValueError:
        return []


def candidates_from_dicom(path: str | Path) -> list[MppCandidate]:
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    spacing = None
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        measures = shared[0].get("PixelMeasuresSequence")
        if measures:
            spacing = measures[0].get("PixelSpacing")
    if spacing is None:
        spacing = ds.get("PixelSpacing")
    if not spacing:
        return []
    # PixelSpacing is (row spacing, column spacing) in millimetres
    return [MppCandidate(float(spacing[1]) * 1000.0, "DICOM PixelSpacing")]


def collect_candidates(path: str | Path, openslide_properties=None) -> list[MppCandidate]:
    """Every resolution the file's metadata states, best source first (never raises on odd metadata)."""
    kind = file_kind(path)
    found: list[MppCandidate] = []
    readers = []
    if kind == "tiff":
        readers.append(lambda: candidates_from_tiff(path))
    if openslide_properties is not None:
        readers.append(lambda: candidates_from_openslide(openslide_properties))
    elif kind != "dicom":
        readers.append(lambda: _openslide_candidates(path))
    if kind == "dicom":
        readers.append(lambda: candidates_from_dicom(path))
    for read in readers:
        try:
            found.extend(read())
        except Exception:  # unreadable metadata is simply no candidate; the pixel reader reports the file
            continue
        if any(c.plausible for c in found):
            break
    return found


def _openslide_candidates(path) -> list[MppCandidate]:
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        return candidates_from_openslide(dict(slide.properties))


def resolve_mpp(
    slide_id: str,
    path: str | Path | None,
    candidates: list[MppCandidate],
    override: float | None = None,
    default: float | None = None,
) -> tuple[float, str]:
    """Pick the level-0 microns per pixel and say where it came from.

    Raises:
        MppError: nothing plausible and no default; the message lists what was rejected and the fix.
    """
    if override is not None:
        if not is_plausible(override):
            raise MppError(f"slide {slide_id!r}: datalist mpp {override!r} is outside {MPP_RANGE[0]}-{MPP_RANGE[1]} um/px; fix the mpp column.")
        return float(override), "datalist mpp column"
    for candidate in candidates:
        if candidate.plausible:
            return round(candidate.value, 6), candidate.source
    if default is not None:
        if not is_plausible(default):
            raise MppError(f"default_mpp {default!r} is outside {MPP_RANGE[0]}-{MPP_RANGE[1]} um/px")
        return float(default), "default_mpp (given by the user)"
    rejected = "; ".join(f"{c.value:.4g} um/px from {c.source} (outside {MPP_RANGE[0]}-{MPP_RANGE[1]})" for c in candidates)
    seen = f"rejected: {rejected}" if rejected else "the file states no resolution (no Aperio MPP, TIFF resolution tags, OpenSlide mpp-x or DICOM PixelSpacing)"
    raise MppError(
        f"slide {slide_id!r} ({path}): no usable microns-per-pixel; {seen}. Fix: add an 'mpp' column to the "
        f"datalist with this slide's level-0 resolution (e.g. 0.25 for a 40x scan, 0.5 for 20x), or pass "
        f"--default_mpp <value> if you know every slide without metadata was scanned at that resolution."
    )
