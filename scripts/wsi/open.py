"""Open a slide with the first backend that can read it (cuCIM -> OpenSlide -> tifffile -> DICOM), then
resolve its level-0 mpp with :mod:`scripts.wsi.mpp` (never a backend's default).

cuCIM is tried only after the crash-safe probe (:mod:`scripts.wsi.probe`) accepted the file. A backend
that opens the file but cannot decode a few pixels is passed over; ``handle.notes`` says why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from scripts.wsi import mpp as mpp_lib
from scripts.wsi.backends import DEFAULT_BACKENDS, handle_class
from scripts.wsi.backends.base import SlideHandle, SlideReadError
from scripts.wsi.filekind import file_kind
from scripts.wsi.probe import probe_cucim

__all__ = ["DEFAULT_BACKENDS", "SlideReadError", "open_slide", "open_first_backend"]


def _open_backend(path: Path, backend: str) -> SlideHandle:
    return handle_class(backend)(path)


def _open_first_backend(
    path: Path, backends: Sequence[str], slide_id: str, cucim_verdict: tuple[bool, str] | None = None
) -> SlideHandle:
    """The first backend in ``backends`` that opens ``path`` and decodes a few pixels (no mpp lookup);
    ``handle.notes`` says why earlier backends were passed over."""
    if not path.is_file():
        raise SlideReadError(f"slide {slide_id!r}: file {path} does not exist; fix the datalist path")
    kind = file_kind(path)
    reasons: list[str] = []
    handle: SlideHandle | None = None
    for backend in backends:
        if backend == "cucim":
            verdict = cucim_verdict or probe_cucim([path])[str(path)]
            if not verdict[0]:
                reasons.append(f"cucim: {verdict[1]}")
                continue
        if backend == "tifffile" and kind != "tiff":
            reasons.append("tifffile: not a TIFF file")
            continue
        if backend == "dicom" and kind != "dicom":
            continue
        try:
            candidate = _open_backend(path, backend)
            # decode a few pixels at the coarsest level so codec problems show up here, not later
            last = candidate.level_count - 1
            candidate.read_region((0, 0), (4, 4), last)
            handle = candidate
            break
        except Exception as error:  # noqa: BLE001 - any failure moves on to the next backend
            reasons.append(f"{backend}: {' '.join(str(error).split())[:300] or type(error).__name__}")
    if handle is None:
        raise SlideReadError(
            f"slide {slide_id!r}: no reader could open {path} ({'; '.join(reasons)}). Check that the file is a "
            f"complete whole-slide image (TIFF/SVS/NDPI/MRXS/DICOM); re-copy it if it was truncated."
        )
    handle.notes.extend(reasons)
    return handle


def open_slide(
    path: str | os.PathLike,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    slide_id: str | None = None,
    mpp: float | None = None,
    default_mpp: float | None = None,
    require_mpp: bool = True,
    cucim_verdict: tuple[bool, str] | None = None,
) -> SlideHandle:
    """Open ``path`` with the first backend that can read it, and resolve its level-0 mpp.

    Args:
        backends: tried in order; cuCIM only after the crash-safe probe said yes.
        slide_id: used in error messages (defaults to the file name).
        mpp: a user-given value (datalist ``mpp`` column) that overrides the metadata.
        default_mpp: used only when neither ``mpp`` nor the metadata has a plausible value.
        require_mpp: raise ``MppError`` when no resolution is found (else ``handle.mpp`` stays None).
        cucim_verdict: a probe verdict already obtained (e.g. by the parent of a worker pool).

    Raises:
        SlideReadError: every backend failed (each one's reason is listed).
        mpp.MppError: no usable resolution and ``require_mpp``.
    """
    path = Path(path)
    slide_id = slide_id or path.stem
    handle = _open_first_backend(path, backends, slide_id, cucim_verdict)
    try:
        candidates = mpp_lib.collect_candidates(path, getattr(handle, "openslide_properties", None))
        try:
            handle.mpp, handle.mpp_source = mpp_lib.resolve_mpp(slide_id, path, candidates, mpp, default_mpp)
        except mpp_lib.MppError:
            if require_mpp:
                raise
    except Exception:
        handle.close()
        raise
    return handle


open_first_backend = _open_first_backend
