"""The per-slide patch coordinate file, ``<output_dir>/patches/<slide_id>.h5``.

Layout (the CLAM / TRIDENT convention): dataset ``coords`` (N, 2) int64, level-0 top-left (x, y), with
the attributes below on the dataset and on the file root: patch_size (output pixels), target_mpp, mpp,
level, level_downsample, read_size_level (level pixels read per patch side), patch_size_level0, scale,
plus mpp_source, backend, slide_path, slide_id.

``read_patch_file`` also reads CLAM files (``coords`` attrs ``patch_level``, ``patch_size`` at that
level, ``downsample``) and TRIDENT files (``patch_size``, ``patch_size_level0``, magnifications).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scripts.io_utils import atomic_path


@dataclass
class PatchFile:
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y)
    patch_size: int  # output side in pixels
    level: int
    read_size_level: int  # side of the region read at ``level``
    patch_size_level0: int | None
    target_mpp: float | None
    mpp: float | None
    level_downsample: float | None
    layout: str  # "smile", "clam" or "trident"
    attrs: dict = field(default_factory=dict)


def write_patch_file(path: str | Path, coords: np.ndarray, attrs: dict) -> None:
    """Write coords + attributes atomically."""
    import h5py

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            dataset = handle.create_dataset("coords", data=coords)
            for key, value in attrs.items():
                if value is None:
                    continue
                value = str(value) if isinstance(value, Path) else value
                dataset.attrs[key] = value
                handle.attrs[key] = value


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def read_patch_file(path: str | Path) -> PatchFile:
    """Read a patch coordinate file written here, by CLAM or by TRIDENT."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as handle:
        if "coords" not in handle:
            raise ValueError(f"{path}: no 'coords' dataset; expected a patch file from this bundle, CLAM or TRIDENT")
        coords = np.asarray(handle["coords"][()], dtype=np.int64).reshape(-1, 2)
        attrs = {k: _plain(v) for k, v in handle.attrs.items()}
        attrs.update({k: _plain(v) for k, v in handle["coords"].attrs.items()})
    if "read_size_level" in attrs:  # written here
        return PatchFile(
            coords, int(attrs["patch_size"]), int(attrs["level"]), int(attrs["read_size_level"]),
            int(attrs["patch_size_level0"]), float(attrs["target_mpp"]), float(attrs["mpp"]),
            float(attrs["level_downsample"]), "smile", attrs,
        )
    if "patch_level" in attrs:  # CLAM: patch_size is measured at patch_level
        level = int(attrs["patch_level"])
        size = int(attrs["patch_size"])
        downsample = attrs.get("downsample")
        ds = float(np.ravel(downsample)[0]) if downsample is not None else None
        return PatchFile(
            coords, size, level, size, int(round(size * ds)) if ds else None, None, None, ds, "clam", attrs,
        )
    if "patch_size_level0" in attrs:  # TRIDENT: level-0 footprint, read from level 0
        size0 = int(attrs["patch_size_level0"])
        return PatchFile(coords, int(attrs.get("patch_size", size0)), 0, size0, size0, None, None, 1.0, "trident", attrs)
    raise ValueError(
        f"{path}: 'coords' has none of the known attributes (read_size_level: this bundle; patch_level: CLAM; "
        f"patch_size_level0: TRIDENT); cannot tell at which level and size to read the patches"
    )


def slide_fingerprint(slide_path) -> str:
    """``<size in bytes>-<mtime in ns>`` of a slide file: a cheap way to tell that a slide changed since
    its patch or feature file was written (re-runs redo such slides instead of reusing stale outputs)."""
    try:
        stat = Path(slide_path).stat()
    except (OSError, TypeError):
        return ""
    return f"{stat.st_size}-{stat.st_mtime_ns}"
