"""Patch-coordinate files: the only code that reads or writes them.

Three layouts are read; the bundle's own is written so that CLAM and TRIDENT read it unchanged.

* **bundle** ``<output_dir>/patches/<slide_id>.h5``: dataset ``coords`` (N, 2) int64, level-0 top-left
  (x, y). The bundle's attributes (``patch_size`` = output pixels at ``target_mpp``, ``target_mpp``, ``mpp``,
  ``level``, ``level_downsample``, ``read_size_level``, ``patch_size_level0``, ``scale``, ``mpp_source``,
  ``slide_path``, ``slide_id`` ...) sit on ``coords`` and on the file root, together with the peers' own
  attribute names (:func:`peer_attrs`): CLAM's ``patch_level``, ``downsample``, ``level_dim``,
  ``downsampled_level_dim``, ``name``, ``save_path`` and TRIDENT's ``patch_size_level0``,
  ``level0_magnification`` (10 / mpp), ``target_magnification`` (10 / target_mpp), ``overlap`` (pixels
  at the target scale), ``savetodir``, ``level0_width``, ``level0_height``.
* **CLAM** ``patches/<slide_id>.h5`` (``create_patches_fp.py``): attributes on ``coords`` only;
  ``patch_size`` is measured at ``patch_level`` and ``downsample`` is that level's (x, y) downsample.
* **TRIDENT** ``<job>/<mag>x_<size>px_<overlap>px_overlap/patches/<slide_id>_patches.h5``: attributes on
  ``coords``; ``patch_size`` is measured at ``target_magnification``, ``patch_size_level0`` is its level-0
  footprint; magnifications are 10 / mpp.

A CLAM ``patch_size`` is pixels at ``patch_level`` while TRIDENT's and the bundle's is pixels at the
target scale; the two agree whenever the bundle reads the patch at a pyramid level of the target scale
(``scale`` 1, the usual case). When it has to resample (``scale`` != 1, e.g. a 0.25 µm/px slide without a
0.5 µm/px level) CLAM's reader would read the wrong footprint; the docs (docs/formats.md) say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from scripts.utils.errors import BundleError
from scripts.utils.io_utils import atomic_path

PATCH_SUFFIXES = ("_patches.h5", ".h5")  # TRIDENT's name first: a folder rarely holds both


class PatchFileError(BundleError, ValueError):
    """A patch-coordinate file that is missing or lacks what the bundle needs (message names the file)."""


@dataclass
class PatchFile:
    """A patch-coordinate file as the bundle needs it, whatever wrote it.

    ``patch_size`` is the side of a patch once read (pixels handed to the encoder's own resize),
    ``read_size_level`` the side of the square read at ``level``, ``patch_size_level0`` its level-0
    footprint. ``mpp`` is the slide's level-0 µm/px when the file says (bundle, TRIDENT), ``target_mpp``
    the µm/px of the patches when the file says. ``layout`` is "bundle", "clam", "trident" or "generic".
    """

    coords: np.ndarray  # (N, 2) int64 level-0 (x, y)
    patch_size: int
    level: int
    read_size_level: int
    patch_size_level0: float | None
    target_mpp: float | None
    mpp: float | None
    level_downsample: float | None
    layout: str
    attrs: dict = field(default_factory=dict)
    path: Path | None = None


# ------------------------------------------------------------------------------------------------ write
def magnification(mpp: float | None) -> float | None:
    """Objective magnification of a µm/px value the way TRIDENT counts it: 10 / mpp (0.25 -> 40x)."""
    mpp = _positive(mpp)
    return None if mpp is None else 10.0 / mpp


def peer_attrs(attrs: dict, level_dim=None) -> dict:
    """CLAM's and TRIDENT's attribute names for a patch grid described by the bundle's ``attrs``.

    ``attrs`` needs ``patch_size``, ``level``, ``level_downsample``, ``patch_size_level0``, ``mpp`` and
    ``target_mpp``; optional ``stride_level0``, ``slide_id``, ``level0_width`` / ``level0_height`` and
    ``level_dim`` (the (width, height) of the read level; else level-0 size / downsample, rounded).
    """
    out: dict = {}
    size = int(attrs["patch_size"])
    level = int(attrs.get("level", 0))
    ds = float(attrs.get("level_downsample") or 1.0)
    mpp, target = _positive(attrs.get("mpp")), _positive(attrs.get("target_mpp"))
    size0 = attrs.get("patch_size_level0")
    exact0 = size * target / mpp if (mpp and target) else (float(size0) if size0 is not None else None)
    out["patch_level"] = level
    out["downsample"] = np.array([ds, ds], dtype=np.float64)
    width, height = attrs.get("level0_width"), attrs.get("level0_height")
    if level_dim is None and attrs.get("level_dim") is not None:
        level_dim = attrs["level_dim"]
    if level_dim is None and width and height:
        level_dim = (int(round(int(width) / ds)), int(round(int(height) / ds)))
    if level_dim is not None:
        out["level_dim"] = np.asarray(level_dim, dtype=np.int64)
        out["downsampled_level_dim"] = np.asarray(level_dim, dtype=np.int64)
    if attrs.get("slide_id"):
        out["name"] = str(attrs["slide_id"])
    if size0 is not None:
        out["patch_size_level0"] = int(round(float(size0)))
    if mpp:
        out["level0_magnification"] = float(magnification(mpp))
    if target:
        out["target_magnification"] = float(magnification(target))
    stride0 = _positive(attrs.get("stride_level0"))
    out["overlap"] = int(round(size * (1.0 - stride0 / exact0))) if (stride0 and exact0) else 0
    if width and height:
        out["level0_width"], out["level0_height"] = int(width), int(height)
    return out


def write_patch_file(path: str | Path, coords: np.ndarray, attrs: dict, level_dim=None) -> None:
    """Write ``coords`` (N, 2) level-0 (x, y) with the bundle's ``attrs`` plus CLAM's and TRIDENT's
    (:func:`peer_attrs`), on the ``coords`` dataset and on the file root, atomically."""
    path = Path(path)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    full = dict(attrs)
    if {"patch_size", "level_downsample"} <= set(full):
        for key, value in peer_attrs(full, level_dim).items():
            full.setdefault(key, value)
        full.setdefault("save_path", str(path.parent))  # CLAM
        full.setdefault("savetodir", str(path.parent))  # TRIDENT
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            dataset = handle.create_dataset("coords", data=coords)
            for key, value in full.items():
                if value is None:
                    continue
                value = str(value) if isinstance(value, Path) else value
                dataset.attrs[key] = value
                handle.attrs[key] = value


# ------------------------------------------------------------------------------------------------- read
def plain(value):
    """An h5 attribute as a plain Python value (bytes -> str, numpy scalars/arrays -> Python)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def h5_attrs(handle, dataset: str | None = "coords") -> dict:
    """Root attributes of an open h5 file overlaid with those of ``dataset`` (where CLAM/TRIDENT keep theirs)."""
    attrs = {k: plain(v) for k, v in handle.attrs.items()}
    if dataset and dataset in handle:
        attrs.update({k: plain(v) for k, v in handle[dataset].attrs.items()})
    return attrs


def _positive(value) -> float | None:
    try:
        value = float(np.ravel(value)[0]) if isinstance(value, (list, tuple, np.ndarray)) else float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def layout_of(attrs: dict) -> str:
    """Which program wrote a coords dataset with these attributes: bundle, clam, trident or generic."""
    if "read_size_level" in attrs:
        return "bundle"
    if "level0_magnification" in attrs or "target_magnification" in attrs:
        return "trident"
    if "patch_level" in attrs:
        return "clam"
    if "patch_size_level0" in attrs and "level" not in attrs:
        return "trident"
    return "generic"


def describe_patches(attrs: dict, coords: np.ndarray, path: Path | None = None) -> PatchFile:
    """A :class:`PatchFile` from ``coords`` and merged attributes (root + ``coords``), any layout.

    Raises :class:`PatchFileError` when the attributes cannot say what to read.
    """
    where = f"{path}: " if path else ""
    layout = layout_of(attrs)
    if layout == "bundle":
        return PatchFile(
            coords, int(attrs["patch_size"]), int(attrs["level"]), int(attrs["read_size_level"]),
            _positive(attrs.get("patch_size_level0")), _positive(attrs.get("target_mpp")), _positive(attrs.get("mpp")),
            _positive(attrs.get("level_downsample")) or 1.0, layout, attrs, path,
        )
    if layout == "clam":  # patch_size pixels read at patch_level
        if "patch_size" not in attrs:
            raise PatchFileError(f"{where}CLAM coords without 'patch_size'; re-run create_patches_fp.py")
        level, size = int(attrs["patch_level"]), int(attrs["patch_size"])
        ds = _positive(attrs.get("downsample"))
        return PatchFile(coords, size, level, size, size * ds if ds else None, None, None, ds, layout, attrs, path)
    if layout == "trident":  # patch_size pixels at the target magnification, read from level 0
        mpp = _positive(10.0 / float(attrs["level0_magnification"])) if _positive(attrs.get("level0_magnification")) else None
        target = _positive(10.0 / float(attrs["target_magnification"])) if _positive(attrs.get("target_magnification")) else None
        if "patch_size" not in attrs and "patch_size_level0" not in attrs:
            raise PatchFileError(f"{where}TRIDENT coords without 'patch_size' or 'patch_size_level0'")
        size0 = _positive(attrs.get("patch_size_level0"))
        size = int(attrs.get("patch_size", 0)) or None
        if size0 is None and size and mpp and target:
            size0 = size * target / mpp
        if size is None:
            size = int(round(size0))
        if size0 is None:
            raise PatchFileError(f"{where}TRIDENT coords: cannot tell the level-0 footprint (needs patch_size_level0, "
                                 "or patch_size with level0_magnification and target_magnification)")
        return PatchFile(coords, size, 0, int(round(size0)), size0, target, mpp, 1.0, layout, attrs, path)
    # generic: a patch_size plus enough to size the region at ``level``
    if "patch_size" not in attrs:
        raise PatchFileError(
            f"{where}'coords' has none of the known attributes (read_size_level: this bundle; patch_level: CLAM; "
            "level0_magnification / patch_size_level0: TRIDENT; or at least patch_size); cannot tell at which "
            "level and size to read the patches")
    size = int(attrs["patch_size"])
    level = int(attrs.get("level", 0))
    ds = _positive(attrs.get("level_downsample")) or 1.0
    mpp, target = _positive(attrs.get("mpp")), _positive(attrs.get("target_mpp"))
    if _positive(attrs.get("patch_size_level0")):
        size0 = float(attrs["patch_size_level0"])
    elif mpp and target:
        size0 = size * target / mpp
    else:
        raise PatchFileError(
            f"{where}cannot tell the region size to read (needs read_size_level, patch_size_level0, or mpp and target_mpp)")
    read = int(round(size0 / ds))
    if read < 1:
        raise PatchFileError(f"{where}region size to read is {read} px")
    return PatchFile(coords, size, level, read, size0, target, mpp, ds, layout, attrs, path)


def read_patch_file(path: str | Path) -> PatchFile:
    """Read a patch-coordinate file written by the bundle, CLAM, TRIDENT, or with a ``patch_size`` and
    enough attributes to size the region (see :func:`describe_patches`)."""
    path = Path(path)
    if not path.is_file():
        raise PatchFileError(f"patch file {path} not found; run the preprocessing workflow first (configs/preprocess.json)")
    try:
        with h5py.File(path, "r") as handle:
            if "coords" not in handle:
                raise PatchFileError(f"{path}: no 'coords' dataset; expected a patch file from this bundle, CLAM or TRIDENT")
            coords = np.asarray(handle["coords"][()])
            attrs = h5_attrs(handle)
    except OSError as error:
        raise PatchFileError(f"{path}: not a readable HDF5 file ({error}); run preprocessing again") from error
    if coords.size and (coords.ndim != 2 or coords.shape[1] != 2):
        raise PatchFileError(f"{path}: 'coords' must be (N, 2), got {coords.shape}")
    return describe_patches(attrs, coords.astype(np.int64).reshape(-1, 2), path)


def patch_file_candidates(slide_id: str, folders) -> list[Path]:
    """Where a slide's patch file may be, in order: for each folder, ``<folder>/<id>_patches.h5`` (TRIDENT)
    then ``<folder>/<id>.h5`` (bundle, CLAM)."""
    return [Path(folder) / f"{slide_id}{suffix}" for folder in folders if folder for suffix in PATCH_SUFFIXES]


def find_patch_file(slide_id: str, folders) -> Path | None:
    """The first existing file of :func:`patch_file_candidates`, or None."""
    return next((p for p in patch_file_candidates(slide_id, folders) if p.is_file()), None)


def slide_fingerprint(slide_path) -> str:
    """``<size in bytes>-<mtime in ns>`` of a slide file: a cheap way to tell that a slide changed since
    its patch or feature file was written (re-runs redo such slides instead of reusing stale outputs)."""
    try:
        stat = Path(slide_path).stat()
    except (OSError, TypeError):
        return ""
    return f"{stat.st_size}-{stat.st_mtime_ns}"


__all__ = [
    "PATCH_SUFFIXES", "PatchFile", "PatchFileError", "describe_patches", "find_patch_file", "h5_attrs",
    "layout_of", "magnification", "patch_file_candidates", "peer_attrs", "plain", "read_patch_file",
    "slide_fingerprint", "write_patch_file",
]
