"""Feature files: the only code that reads or writes them.

Layouts read (``features`` is (N, D), or (1, N, D) which is squeezed):

* **bundle** ``<output_dir>/features/<slide_id>.h5``: ``features`` float32 and ``coords`` (N, 2) level-0
  (x, y) in patch-file order. Written by :class:`FeatureWriter` with, on ``coords``, every patch-file
  attribute (the bundle's and CLAM's / TRIDENT's names, see :mod:`scripts.formats.patch_file`) plus
  ``encoder``, ``weights_sha256``, ``feature_dim``, ``precision``, ``mpp``, ``target_mpp``; the same on
  the file root; ``features.attrs['encoder']`` as TRIDENT writes it.
* **CLAM** ``h5_files/<slide_id>.h5`` (``features`` float32, ``coords`` int32, no attributes) and
  ``pt_files/<slide_id>.pt`` (the features tensor alone; its coordinates are those of the ``h5_files``
  twin or of CLAM's ``patches/<slide_id>.h5``, same order).
* **TRIDENT** ``features_<encoder>/<slide_id>.h5``: ``features``, ``coords`` with the patch attributes,
  ``features.attrs['encoder']``.
* a ``.pt`` / ``.pth`` holding a dict with a ``features`` tensor (and optionally ``coords``).

Where a slide's features are found (:func:`find_feature_file`), in this order: the datalist's ``features``
column; ``<output_dir>/features/<slide_id>.h5`` (or ``.pt``); then every folder of ``feature_dirs``, in
the order given, each as ``<dir>/<slide_id>.h5``, ``<dir>/h5_files/<slide_id>.h5``,
``<dir>/pt_files/<slide_id>.pt``, ``<dir>/features_*/<slide_id>.h5`` (a TRIDENT job's magnification
folder; more than one encoder there is an error asking for the ``features`` column).

The level-0 patch footprint needed for heat maps and GeoJSON (:func:`patch_geometry`) comes from the
feature file's attributes, else from the patch file beside it (``<dir>/../patches/<id>.h5`` or
``<id>_patches.h5``, then ``<output_dir>/patches/``), else from the slide's mpp and the configured patch
size and target mpp, in that order; the source is returned with the value.

Checks on import (:func:`check_features`): patch scale vs the model's ``target_mpp`` (10% tolerance),
encoder name and feature dimension vs what the fold models were trained on, and coords/features rows.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np
import torch

from scripts.formats.layout import OutputLayout
from scripts.formats.patch_file import (
    PatchFile,
    PatchFileError,
    describe_patches,
    find_patch_file,
    h5_attrs,
    peer_attrs,
    plain,
    read_patch_file,
)
from scripts.utils.errors import BundleError
from scripts.utils.io_utils import atomic_path

FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt", ".pth")
H5_SUFFIXES = (".h5", ".hdf5")
SCALE_TOLERANCE = 0.10  # patches within 10% of the model's target mpp are accepted
OVERRIDE = "--feature_checks false"


class FeatureFileError(BundleError, ValueError):
    """A feature file that cannot be used (message names the file and what is wrong)."""


class FeatureMismatchError(FeatureFileError):
    """Features that do not fit the model or the cohort: names the file, what was found, what was expected
    and the override."""


# ------------------------------------------------------------------------------------------------- read
def _open_h5(path: Path):
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({error}); re-run feature extraction") from error


def _load_pt(path: Path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file: one clear message
        raise FeatureFileError(f"{path}: not a readable torch file ({error}); re-run feature extraction") from error
    coords = None
    if isinstance(obj, dict):
        if "features" not in obj:
            raise FeatureFileError(f"{path}: a dict without a 'features' tensor (keys: {', '.join(map(str, obj))})")
        coords = obj.get("coords")
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise FeatureFileError(f"{path}: expected a tensor (N, D), got {type(obj).__name__}")
    return obj, coords


def _squeeze(shape_or_tensor, path: Path, allow_empty: bool = False):
    shape = tuple(shape_or_tensor.shape)
    if len(shape) == 3 and shape[0] == 1:
        shape_or_tensor = shape_or_tensor[0]
        shape = shape[1:]
    if len(shape) != 2 or (shape[0] == 0 and not allow_empty):
        raise FeatureFileError(f"{path}: features must be a non-empty (N, D) array, got shape {shape}")
    return shape_or_tensor


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FEATURE_SUFFIXES:
        raise FeatureFileError(f"{path}: unknown feature file type {suffix!r}; use .h5 (dataset 'features') or .pt")
    return suffix


def load_features(path: str | Path) -> torch.Tensor:
    """One bag's features as a float32 (N, D) tensor (h5 dataset ``features``, or a .pt tensor / dict)."""
    path = Path(path)
    if _check_suffix(path) in H5_SUFFIXES:
        with _open_h5(path) as handle:
            if "features" not in handle:
                raise FeatureFileError(f"{path}: no dataset 'features' (found: {', '.join(handle.keys()) or 'nothing'})")
            array = handle["features"][()]
        tensor = torch.from_numpy(np.asarray(array, dtype=np.float32))
    else:
        tensor = _load_pt(path)[0].detach().to(torch.float32)
    return _squeeze(tensor, path)


def feature_shape(path: str | Path) -> tuple[int, int]:
    """(N, D) of a feature file, reading only the header where the format allows (h5)."""
    path = Path(path)
    if _check_suffix(path) in H5_SUFFIXES:
        with _open_h5(path) as handle:
            if "features" not in handle:
                raise FeatureFileError(f"{path}: no dataset 'features'")
            shape = _squeeze(handle["features"], path).shape
        return int(shape[0]), int(shape[1])
    return tuple(load_features(path).shape)  # type: ignore[return-value]


def companion_h5(path: Path, slide_id: str | None = None) -> Path | None:
    """The h5 twin of a ``pt_files/<id>.pt`` holding its coordinates: CLAM's ``h5_files/<id>.h5``, the
    bundle's ``features/<id>.h5``, or ``<id>.h5`` beside it."""
    slide_id = slide_id or path.stem
    for candidate in (path.parent.parent / "h5_files" / f"{slide_id}.h5", path.parent.parent / "features" / f"{slide_id}.h5",
                      path.with_suffix(".h5")):
        if candidate.is_file() and candidate != path:
            return candidate
    return None


def nearby_patch_folders(feature_path: Path, output_dir: str | Path | None = None) -> list[Path]:
    """Folders a feature file's patch file may sit in, in search order: ``<dir>/../patches`` (CLAM's
    results folder, TRIDENT's magnification folder), ``<dir>/../../patches``, ``<output_dir>/patches``."""
    folders = [feature_path.parent.parent / "patches", feature_path.parent.parent.parent / "patches"]
    if output_dir not in (None, ""):
        folders.append(OutputLayout(output_dir).patches_dir)
    seen, out = set(), []
    for folder in folders:
        key = str(folder.resolve()) if folder.exists() else str(folder)
        if key not in seen:
            seen.add(key)
            out.append(folder)
    return out


def read_features(path: str | Path, rows_per_read: int = 4096, slide_id: str | None = None,
                  patch_folders: Sequence[Path] = ()) -> tuple[torch.Tensor, np.ndarray]:
    """Features (N, D) float32 and coords (N, 2) level-0 (x, y).

    h5 files are read in row blocks into one preallocated array. A ``.pt`` (CLAM ``pt_files``) takes its
    coordinates from a ``coords`` entry, else its ``h5_files`` twin, else the patch file beside it (or in
    ``patch_folders``). Raises :class:`FeatureFileError` when rows and coords disagree.
    """
    path = Path(path)
    if _check_suffix(path) in H5_SUFFIXES:
        with _open_h5(path) as handle:
            if "features" not in handle or "coords" not in handle:
                raise FeatureFileError(f"{path} needs datasets 'features' (N, D) and 'coords' (N, 2) "
                                       f"(found: {', '.join(handle.keys()) or 'nothing'})")
            dataset = handle["features"]
            squeeze = dataset.ndim == 3 and dataset.shape[0] == 1
            n, d = _squeeze(dataset, path, allow_empty=True).shape if not squeeze else dataset.shape[1:]
            features = torch.empty((n, d), dtype=torch.float32)
            view = features.numpy()
            for start in range(0, n, rows_per_read):
                stop = min(n, start + rows_per_read)
                view[start:stop] = dataset[0, start:stop] if squeeze else dataset[start:stop]
            coords = np.asarray(handle["coords"][()])
        coords_from = path
    else:
        tensor, coords = _load_pt(path)
        features = _squeeze(tensor.detach().to(torch.float32), path, allow_empty=True).contiguous()
        coords_from = path
        if coords is None:
            coords, coords_from = _coords_for_pt(path, slide_id, patch_folders)
        coords = np.asarray(coords.numpy() if torch.is_tensor(coords) else coords)
    coords = coords.reshape(-1, 2) if coords.size else coords.reshape(0, 2)
    check_rows(len(features), len(coords), path, coords_from)
    return features, coords.astype(np.int64)


def _names(path: Path, slide_id: str | None) -> list[str]:
    """Names a feature file's companions may carry: the slide id, then the file's own stem."""
    return list(dict.fromkeys(n for n in (slide_id, path.stem) if n))


def _coords_for_pt(path: Path, slide_id: str | None, patch_folders: Sequence[Path]) -> tuple[np.ndarray, Path]:
    folders = list(nearby_patch_folders(path)) + [Path(f) for f in patch_folders]
    for name in _names(path, slide_id):
        twin = companion_h5(path, name)
        if twin is not None:
            with _open_h5(twin) as handle:
                if "coords" in handle:
                    return np.asarray(handle["coords"][()]), twin
    for name in _names(path, slide_id):
        patch = find_patch_file(name, folders)
        if patch is not None:
            return read_patch_file(patch).coords, patch
    slide_id = slide_id or path.stem
    raise FeatureFileError(
        f"{path}: a .pt feature file holds no coordinates and none were found beside it (looked for "
        f"{path.parent.parent / 'h5_files' / (slide_id + '.h5')} and patches/{slide_id}.h5 / {slide_id}_patches.h5 "
        f"in {', '.join(str(f) for f in folders)}); put the h5_files/ or patches/ folder beside pt_files/, or use the .h5 file")


def check_rows(n_features: int, n_coords: int, path: Path, coords_from: Path | None = None) -> None:
    """Refuse features whose row count differs from the coordinates'."""
    if n_features != n_coords:
        source = "" if coords_from in (None, path) else f" (coordinates from {coords_from})"
        raise FeatureMismatchError(
            f"{path}: {n_features} feature rows but {n_coords} coordinates{source}; expected one coordinate per "
            "feature row in the same order. The file is truncated or paired with the wrong patch file: extract "
            "the features again (no override: heat maps would put attention on the wrong patches)")


# ------------------------------------------------------------------------------------------ description
@dataclass
class FeatureInfo:
    """What a feature file says about itself (headers only; the features are not read).

    ``layout``: bundle, clam_h5, clam_pt, trident or generic. ``encoder``: the encoder name when the file
    or its folder says (``features_<encoder>``), else None. ``patch``: the patch description from the
    file's own ``coords`` attributes, or None.
    """

    path: Path
    n: int
    dim: int
    layout: str
    encoder: str | None = None
    attrs: dict = field(default_factory=dict)
    patch: PatchFile | None = None


_TRIDENT_DIR = re.compile(r"^features_(.+)$")


def feature_info(path: str | Path) -> FeatureInfo:
    """Describe a feature file of any layout from its header (and its folder's name)."""
    path = Path(path)
    if _check_suffix(path) not in H5_SUFFIXES:
        n, d = feature_shape(path)
        return FeatureInfo(path, n, d, "clam_pt" if path.parent.name == "pt_files" else "generic")
    with _open_h5(path) as handle:
        if "features" not in handle:
            raise FeatureFileError(f"{path}: no dataset 'features' (found: {', '.join(handle.keys()) or 'nothing'})")
        n, d = _squeeze(handle["features"], path, allow_empty=True).shape
        attrs = h5_attrs(handle)
        feature_attrs = {k: plain(v) for k, v in handle["features"].attrs.items()}
        coords = np.asarray(handle["coords"][()]).reshape(-1, 2) if "coords" in handle else np.zeros((0, 2), np.int64)
        n_coords = len(coords) if "coords" in handle else None
    encoder = feature_attrs.get("encoder") or attrs.get("encoder")
    folder = _TRIDENT_DIR.match(path.parent.name)
    if not encoder and folder:
        encoder = folder.group(1)
    patch = None
    with contextlib.suppress(PatchFileError, KeyError, TypeError, ValueError):
        if any(k in attrs for k in ("patch_size", "patch_size_level0", "patch_level")):
            patch = describe_patches(attrs, coords, path)
    if "weights_sha256" in attrs or "read_size" in attrs:
        layout = "bundle"
    elif folder or patch is not None and patch.layout == "trident":
        layout = "trident"
    elif path.parent.name == "h5_files" or not attrs:
        layout = "clam_h5"
    else:
        layout = "generic"
    info = FeatureInfo(path, int(n), int(d), layout, str(encoder) if encoder else None, attrs, patch)
    if n_coords is not None:
        check_rows(info.n, n_coords, path)
    return info


# ---------------------------------------------------------------------------------------------- search
def feature_candidates(slide_id: str, output_dir: str | Path | None = None,
                       feature_dirs: Iterable[str | Path] = ()) -> list[Path]:
    """Where a slide's feature file is looked for, in order (see the module docstring)."""
    out: list[Path] = []
    if output_dir not in (None, ""):
        out += [OutputLayout(output_dir).features_dir / f"{slide_id}{s}" for s in (".h5", ".pt")]
    for folder in feature_dirs or ():
        folder = Path(folder)
        out += [folder / f"{slide_id}{suffix}" for suffix in FEATURE_SUFFIXES]
        out += [folder / "h5_files" / f"{slide_id}.h5", folder / "pt_files" / f"{slide_id}.pt"]
        if folder.is_dir():
            out += sorted(p / f"{slide_id}.h5" for p in folder.glob("features_*") if p.is_dir())
    return out


def find_feature_file(slide_id: str, features: str | Path | None = None, output_dir: str | Path | None = None,
                      feature_dirs: Iterable[str | Path] = ()) -> Path | None:
    """The slide's feature file: ``features`` (the datalist column) when given, else the first existing
    :func:`feature_candidates`; None when there is none. Two TRIDENT encoders for one slide is an error."""
    if features not in (None, ""):
        return Path(features)
    found = [p for p in feature_candidates(slide_id, output_dir, feature_dirs) if p.is_file()]
    trident = [p for p in found if _TRIDENT_DIR.match(p.parent.name)]
    if found and found[0] in trident and len(trident) > 1:
        raise FeatureFileError(
            f"slide {slide_id}: features of several encoders found ({', '.join(str(p) for p in trident)}); "
            "name the one to use in the datalist's 'features' column")
    return found[0] if found else None


# ------------------------------------------------------------------------------------------- geometry
@dataclass
class PatchGeometry:
    """Level-0 footprint of a feature file's patches and where it came from.

    ``source``: "feature file <path>", "patch file <path>", "slide mpp ... + configured patch size ...", or
    "" when unknown. ``slide_mpp``: level-0 µm/px (the file's, else the datalist's or the slide's).
    ``patch_size``: the patch side in pixels as the file states it (CLAM: at its ``patch_level``).
    """

    patch_size_level0: float | None
    source: str
    slide_mpp: float | None = None
    patch_size: int | None = None

    @property
    def footprint_um(self) -> float | None:
        """Side of one patch in µm."""
        if self.patch_size_level0 and self.slide_mpp:
            return float(self.patch_size_level0) * float(self.slide_mpp)
        return None

    def patch_mpp(self, at_size: int | None = None) -> float | None:
        """µm/px of the patches once they are ``at_size`` pixels (default: their own size)."""
        size = at_size or self.patch_size
        return self.footprint_um / float(size) if (self.footprint_um and size) else None


def patch_geometry(feature_path: str | Path, slide_id: str, output_dir: str | Path | None = None,
                   slide_mpp: float | None = None, patch_size: int | None = None,
                   target_mpp: float | None = None, info: FeatureInfo | None = None) -> PatchGeometry:
    """Level-0 patch side of a feature file: from its attributes, else the patch file beside it, else the
    slide's mpp with the configured ``patch_size`` and ``target_mpp`` — in that order, source recorded."""
    feature_path = Path(feature_path)
    info = info or feature_info(feature_path)
    candidates: list[tuple[PatchFile, str]] = []
    if info.patch is not None:
        candidates.append((info.patch, f"feature file {feature_path}"))
    folders = nearby_patch_folders(feature_path, output_dir)
    patch_path = next((p for p in (find_patch_file(n, folders) for n in _names(feature_path, slide_id)) if p), None)
    if patch_path is not None:
        with contextlib.suppress(PatchFileError):
            candidates.append((read_patch_file(patch_path), f"patch file {patch_path}"))
    for patch, source in candidates:
        if patch.patch_size_level0:
            return PatchGeometry(float(patch.patch_size_level0), source, patch.mpp or slide_mpp, patch.patch_size)
    if slide_mpp and patch_size and target_mpp:
        size0 = float(patch_size) * float(target_mpp) / float(slide_mpp)
        return PatchGeometry(size0, f"slide mpp {slide_mpp:g} + configured patch size {patch_size} px at "
                                    f"{target_mpp:g} µm/px", slide_mpp, int(patch_size))
    return PatchGeometry(None, "", slide_mpp, None)


# ------------------------------------------------------------------------------------------------ checks
@dataclass
class FeatureExpectation:
    """What the fold models were trained on (from their checkpoints), each None when unknown:
    encoder name, feature dimension, patch µm/px and patch side in pixels."""

    encoder: str | None = None
    feature_dim: int | None = None
    target_mpp: float | None = None
    patch_size: int | None = None

    @classmethod
    def from_checkpoints(cls, extras: Sequence[dict]) -> "FeatureExpectation":
        """Merge the ``features`` record of each checkpoint; folds that disagree are an error."""
        records = [e.get("features") for e in extras if isinstance(e.get("features"), dict)]
        out = cls()
        for key in ("encoder", "feature_dim", "target_mpp", "patch_size"):
            values = {r.get(key) for r in records if r.get(key) not in (None, "")}
            if len(values) > 1:
                raise FeatureMismatchError(f"the fold checkpoints disagree on {key}: {sorted(map(str, values))}; "
                                           "use checkpoints of one training run")
            if values:
                setattr(out, key, values.pop())
        return out


def _same_encoder(found: str, expected: str) -> bool:
    return _encoder_key(found) == _encoder_key(expected)


def _encoder_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())  # "CTransPath" == "ctranspath"


def check_features(info: FeatureInfo, expected: FeatureExpectation, geometry: PatchGeometry | None = None,
                   tolerance: float = SCALE_TOLERANCE, override: str = OVERRIDE) -> list[str]:
    """Refuse features that do not fit the model: feature dimension, encoder name, patch scale.

    The patch scale is the patches' µm/px once resized to the models' patch size (their footprint in µm
    over ``expected.patch_size``, else over the file's own patch size), compared with
    ``expected.target_mpp``. Returns notes on what could not be checked (a CLAM file names no encoder).
    Raises :class:`FeatureMismatchError` naming the file, what was found, what was expected and ``override``.
    """
    notes: list[str] = []
    path = info.path
    if expected.feature_dim is not None and info.dim != int(expected.feature_dim):
        raise FeatureMismatchError(
            f"{path}: features have dimension {info.dim}, the models were trained on {expected.feature_dim}-dimensional "
            f"features{f' ({expected.encoder})' if expected.encoder else ''}; extract the features with that encoder "
            "(no override: the models cannot take this input)")
    if expected.encoder:
        if info.encoder is None:
            notes.append(f"{path} names no encoder; assumed {expected.encoder} (same dimension {info.dim})")
        elif not _same_encoder(info.encoder, str(expected.encoder)):
            raise FeatureMismatchError(
                f"{path}: features from encoder {info.encoder!r}, the models were trained on {expected.encoder!r}; "
                f"extract the features with {expected.encoder} (override, at your own risk: {override})")
    if expected.target_mpp:
        target = float(expected.target_mpp)
        found = geometry.patch_mpp(expected.patch_size) if geometry is not None else None
        if found is None:
            notes.append(f"{path}: patch scale unknown (no mpp); assumed {target:g} µm/px")
        elif abs(found / target - 1.0) > tolerance:
            size = expected.patch_size or geometry.patch_size
            raise FeatureMismatchError(
                f"{path}: patches of {geometry.footprint_um:.0f} µm, i.e. {found:.3g} µm/px ({10.0 / found:.3g}x) at "
                f"{size} px; the models were trained on {target:.3g} µm/px ({10.0 / target:.3g}x, "
                f"{target * size:.0f} µm patches), tolerance {tolerance:.0%}; make the patches at "
                f"{10.0 / target:.3g}x and extract again (override, at your own risk: {override})")
    return notes


def cohort_record(infos: Sequence[tuple[str, FeatureInfo, PatchGeometry | None]],
                  tolerance: float = SCALE_TOLERANCE) -> dict:
    """The encoder / feature_dim / target_mpp / patch_size of a training cohort, recorded in each fold
    checkpoint. Refuses a cohort that mixes feature sizes, encoders or patch footprints (beyond
    ``tolerance``), naming a slide of each group. ``infos``: (slide_id, FeatureInfo, geometry or None).
    """
    def groups(key):
        out: dict = {}
        for slide_id, info, geometry in infos:
            value = key(info, geometry)
            if value is not None:
                out.setdefault(value, []).append(slide_id)
        return out

    def listed(g):
        return "; ".join(f"{value}: {len(ids)} slide(s), e.g. {ids[0]}" for value, ids in g.items())

    dims = groups(lambda i, g: i.dim)
    if len(dims) > 1:
        raise FeatureMismatchError(f"the cohort's feature files disagree on the feature size ({listed(dims)}); "
                                   "use one encoder for every slide")
    encoders = groups(lambda i, g: _encoder_key(i.encoder) if i.encoder else None)
    if len(encoders) > 1:
        names = {_encoder_key(i.encoder): i.encoder for _, i, _ in reversed(infos) if i.encoder}
        encoders = {names[key]: ids for key, ids in encoders.items()}
        raise FeatureMismatchError(f"the cohort mixes encoders ({listed(encoders)}); extract every slide with "
                                   "one encoder, or drop the other slides from the datalist")
    known = [(sid, g) for sid, _, g in infos if g is not None and g.footprint_um and g.patch_size]
    sizes = groups(lambda i, g: g.patch_size if g is not None and g.footprint_um and g.patch_size else None)
    patch_size = max(sizes, key=lambda k: len(sizes[k])) if sizes else None
    scales = sorted(g.footprint_um for _, g in known)
    if scales and scales[-1] / scales[0] - 1.0 > tolerance:
        by_scale = groups(lambda i, g: f"{g.footprint_um:.0f} µm patches ({g.patch_mpp(patch_size):.3g} µm/px)"
                          if g is not None and g.footprint_um and g.patch_size else None)
        raise FeatureMismatchError(f"the cohort mixes patch scales ({listed(by_scale)}); make every slide's patches "
                                   "at one scale, or drop the other slides from the datalist")
    names = [i.encoder for _, i, _ in infos if i.encoder]
    return {
        "encoder": names[0] if names else None,
        "feature_dim": next(iter(dims)) if dims else None,
        "target_mpp": round(float(np.median(scales)) / patch_size, 5) if scales and patch_size else None,
        "patch_size": int(patch_size) if patch_size else None,
    }


# ------------------------------------------------------------------------------------------------ write
class FeatureWriter:
    """A bundle feature file being written: a temporary h5 renamed into place by :meth:`commit`.

    ``patch`` describes the patches (its ``attrs`` are copied, and CLAM's / TRIDENT's names added, on
    ``coords`` and the root); ``attrs`` are the extraction's own (``encoder``, ``weights_sha256``,
    ``precision``, ``slide_fingerprint``, ...). ``pt_file``: also write CLAM's ``pt_files/<id>.pt``.
    """

    def __init__(self, final: str | Path, coords: np.ndarray, feature_dim: int, attrs: dict,
                 patch: PatchFile | None = None, pt_file: str | Path | None = None) -> None:
        self.final = Path(final)
        self.pt_file = None if pt_file in (None, "") else Path(pt_file)
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.final))
        self.h5 = h5py.File(tmp, "w")
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        n = len(coords)
        self.features = self.h5.create_dataset(
            "features", shape=(n, feature_dim), dtype="float32",
            chunks=(max(1, min(n, 256)), feature_dim) if n else None)
        dataset = self.h5.create_dataset("coords", data=coords)
        full = self.feature_file_attrs(patch, attrs, feature_dim)
        for key, value in full.items():
            if value is None:
                continue
            value = str(value) if isinstance(value, Path) else value
            dataset.attrs[key] = value
            self.h5.attrs[key] = value
        if full.get("encoder"):
            self.features.attrs["encoder"] = str(full["encoder"])
        self.written, self.n = 0, n

    @staticmethod
    def feature_file_attrs(patch: PatchFile | None, attrs: dict, feature_dim: int) -> dict:
        """Patch attributes (bundle + peers') overlaid with the extraction's ``attrs``."""
        full: dict = {}
        if patch is not None:
            full.update({k: v for k, v in patch.attrs.items() if k not in ("save_path", "savetodir")})
            known = {"patch_size": patch.patch_size, "level": patch.level, "level_downsample": patch.level_downsample,
                     "patch_size_level0": patch.patch_size_level0, "mpp": patch.mpp, "target_mpp": patch.target_mpp,
                     "read_size_level": patch.read_size_level}
            for key, value in known.items():
                if value is not None:
                    full.setdefault(key, value)
            if patch.layout == "clam":  # CLAM's patch_size is at patch_level: keep it, add the footprint
                full["patch_size"] = patch.patch_size
            for key, value in peer_attrs(full).items():
                full.setdefault(key, value)
            if full.get("patch_size_level0") is not None:
                full["patch_size_level0"] = int(round(float(full["patch_size_level0"])))
        full.update({k: v for k, v in attrs.items() if v is not None})
        full["feature_dim"] = int(feature_dim)
        return full

    def write(self, feats: np.ndarray) -> None:
        end = self.written + len(feats)
        if end > self.n:
            raise RuntimeError(f"reader returned more patches than the {self.n} in the patch file")
        self.features[self.written:end] = feats
        self.written = end

    def commit(self) -> None:
        if self.written != self.n:
            raise RuntimeError(f"only {self.written} of {self.n} patches were read")
        features = self.features[()] if self.pt_file is not None else None
        self.h5.close()
        self._stack.close()  # rename into place
        if features is not None:
            write_pt_file(self.pt_file, features)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.h5.close()
        with contextlib.suppress(Exception):
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)  # deletes the temporary file


def write_pt_file(path: str | Path, features) -> None:
    """CLAM's ``pt_files/<id>.pt``: the (N, D) float32 features tensor alone, written atomically."""
    tensor = torch.as_tensor(np.asarray(features, dtype=np.float32))
    with atomic_path(path) as tmp:
        torch.save(tensor, tmp)


def feature_file_is_complete(path: str | Path, coords: np.ndarray, encoder_name: str, weights_sha256: str,
                             feature_dim: int, fingerprint: str | None = None) -> bool:
    """True when ``path`` holds features of every patch in ``coords`` from this very encoder and weights
    (and, when ``fingerprint`` is given, from the slide file as it is now)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as h5:
            feats, stored = h5["features"], h5["coords"][()]
            return (
                feats.shape == (len(coords), feature_dim)
                and np.array_equal(stored.reshape(-1, 2), coords)
                and h5.attrs.get("encoder") == encoder_name
                and h5.attrs.get("weights_sha256") == weights_sha256
                and (fingerprint is None or h5.attrs.get("slide_fingerprint", "") == fingerprint)
            )
    except Exception:  # noqa: BLE001 - unreadable: extract again
        return False


def finite_or_none(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


__all__ = [
    "FEATURE_SUFFIXES", "FeatureExpectation", "FeatureFileError", "FeatureInfo", "FeatureMismatchError",
    "FeatureWriter", "PatchGeometry", "check_features", "check_rows", "cohort_record", "companion_h5",
    "feature_candidates", "feature_file_is_complete", "feature_info", "feature_shape", "find_feature_file",
    "load_features", "nearby_patch_folders", "patch_geometry", "read_features", "write_pt_file",
]
