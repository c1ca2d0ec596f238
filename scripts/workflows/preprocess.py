"""Preprocessing workflow: datalist -> per-slide tissue patch grids, previews and a summary.

Run through the bundle config::

    python -m monai.bundle run --config_file configs/preprocess.json --datalist <csv> --output_dir <dir>

Per slide (``preprocess_slide``, reused by the inference workflow): open with backend fallback behind
a crash-safe cuCIM probe, resolve the level-0 mpp from the metadata (or the datalist), segment tissue
on a low-resolution image, lay a grid of ``patch_size`` px patches at ``target_mpp``, and write
``patches/<slide_id>.h5`` and ``previews/<slide_id>.png`` atomically. ``PreprocessWorkflow`` validates
the datalist first, skips finished slides (unless ``overwrite``), runs slides in worker processes with
a progress bar, and writes ``preprocess_summary.csv`` with one row per slide (ok / failed / no_tissue).
A slide that breaks its worker process is retried alone and then reported as failed.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from monai.transforms import Compose
from tqdm.auto import tqdm

from scripts.data.datalist import SlideRecord, load_datalist
from scripts.formats.layout import OutputLayout
from scripts.formats.patch_file import read_patch_file, slide_fingerprint, write_patch_file
from scripts.transforms import OpenSlided, PatchGridd, TissueMaskd
from scripts.utils.errors import find_bundle_error, raise_if_all_failed
from scripts.utils.io_utils import write_csv
from scripts.wsi import mpp as mpp_lib
from scripts.wsi.open import DEFAULT_BACKENDS, SlideReadError
from scripts.wsi.preview import save_preview
from scripts.wsi.probe import probe_cucim
from scripts.wsi.reader import SlideWSIReader
from scripts.wsi.tissue import TissueParams, warm_up_itk

logger = logging.getLogger("scripts.workflows.preprocess")

SUMMARY_COLUMNS = [
    "slide_id", "status", "error", "warning", "mpp", "mpp_source", "backend", "level", "level_downsample",
    "read_size_level", "scale", "n_patches", "tissue_area_mm2", "seconds", "seconds_read", "seconds_tissue",
    "seconds_grid", "path", "patch_file", "preview",
]


@dataclass
class PreprocessSettings:
    """What a patch is and how tissue is found (every field can be set in configs/preprocess.json)."""

    patch_size: int = 256
    target_mpp: float = 0.5
    overlap: float = 0.0  # fraction of a patch shared with its neighbour
    stride: int | None = None  # output pixels between patch origins; overrides overlap when set
    min_tissue_fraction: float = 0.5
    mask_mpp: float = 4.0  # resolution of the tissue mask (um/px)
    max_mask_side: int = 4096  # the mask never gets larger than this (very large slides)
    tissue: TissueParams = field(default_factory=TissueParams)
    default_mpp: float | None = None  # used only for slides without any resolution metadata
    backends: Sequence[str] = DEFAULT_BACKENDS
    overwrite: bool = False
    preview: bool = True
    preview_size: int = 1024
    cucim_verdicts: dict = field(default_factory=dict)  # filled by the workflow from one probe pass
    # the per-slide steps (open + mpp, tissue mask, patch grid) as a MONAI Compose of dictionary transforms
    # (configs/preprocess.json declares them); None: built from the fields above by default_slide_transforms
    transforms: Any = None

    @property
    def effective_overlap(self) -> float:
        if self.stride is None:
            return float(self.overlap)
        if not 0 < self.stride <= self.patch_size:
            raise ValueError(f"stride {self.stride} must be in 1..patch_size ({self.patch_size})")
        return 1.0 - float(self.stride) / self.patch_size


def default_slide_transforms(settings: PreprocessSettings):
    """The Compose configs/preprocess.json declares, built from ``settings``: open the slide with
    :class:`~scripts.wsi.reader.SlideWSIReader` (trusted mpp), tissue mask, patch grid."""
    reader = SlideWSIReader(backends=settings.backends, default_mpp=settings.default_mpp)
    return Compose([
        OpenSlided("image", reader=reader),
        TissueMaskd("wsi", params=settings.tissue, mask_mpp=settings.mask_mpp, max_mask_side=settings.max_mask_side),
        PatchGridd("wsi", patch_size=settings.patch_size, target_mpp=settings.target_mpp,
                   overlap=settings.effective_overlap, min_tissue_fraction=settings.min_tissue_fraction),
    ])


def run_slide_transforms(transforms, data: dict) -> tuple[dict, dict]:
    """Apply ``transforms`` (a Compose, a list, or one callable) to ``data``; returns the result and the
    seconds each step took (keys ``read`` / ``tissue`` / ``grid`` for the three default steps)."""
    steps = list(getattr(transforms, "transforms", None) or (transforms if isinstance(transforms, (list, tuple)) else [transforms]))
    names = ["read", "tissue", "grid"] + [f"step{i}" for i in range(3, len(steps))]
    seconds: dict = {}
    for name, step in zip(names, steps):
        start = time.perf_counter()
        try:
            data = step(data)
        except Exception as error:
            # MONAI wraps a transform's error in "applying transform ..."; the slide's own error is more useful
            raise (find_bundle_error(error) or error) from error
        seconds[name] = time.perf_counter() - start
    return data, seconds


def _row(record: SlideRecord, **values) -> dict:
    row = {key: "" for key in SUMMARY_COLUMNS}
    row.update(slide_id=record.slide_id, path="" if record.path is None else str(record.path))
    row.update({k: v for k, v in values.items() if v is not None})
    return row


def patch_file_path(output_dir, slide_id) -> Path:
    return OutputLayout(output_dir).patch_file(slide_id)


def preview_path(output_dir, slide_id) -> Path:
    return OutputLayout(output_dir).preview(slide_id)


def preprocess_slide(record: SlideRecord, settings: PreprocessSettings, output_dir: str | Path) -> dict:
    """Patch one slide; never raises for a bad slide: returns its summary row (status ok/failed/no_tissue)."""
    start = time.perf_counter()
    output_dir = Path(output_dir)
    h5_path = patch_file_path(output_dir, record.slide_id)
    png_path = preview_path(output_dir, record.slide_id)
    if h5_path.exists() and not settings.overwrite:
        try:
            done = read_patch_file(h5_path)
            attrs = done.attrs
            if not _patch_file_matches(attrs, record, settings):
                raise ValueError("stale patch file: the slide or the patch settings changed")
            return _row(
                record, status="ok", warning="skipped: patch file already exists (overwrite=true redoes it)",
                mpp=attrs.get("mpp"), mpp_source=attrs.get("mpp_source"), backend=attrs.get("backend"),
                level=attrs.get("level"), level_downsample=attrs.get("level_downsample"),
                read_size_level=attrs.get("read_size_level"), scale=attrs.get("scale"), n_patches=len(done.coords),
                tissue_area_mm2=attrs.get("tissue_area_mm2"), seconds=0.0, patch_file=str(h5_path),
                preview=str(png_path) if png_path.exists() else "",
            )
        except Exception:  # unreadable leftover: redo the slide
            pass
    try:
        return _preprocess_open_slide(record, settings, output_dir, h5_path, png_path, start)
    except (SlideReadError, mpp_lib.MppError) as error:
        return _row(record, status="failed", error=str(error), seconds=round(time.perf_counter() - start, 3))
    except Exception as error:  # noqa: BLE001 - one bad slide never stops a batch
        where = traceback.extract_tb(error.__traceback__)[-1]
        message = f"{type(error).__name__}: {error} (at {Path(where.filename).name}:{where.lineno})"
        return _row(record, status="failed", error=f"slide {record.slide_id!r}: {message}",
                    seconds=round(time.perf_counter() - start, 3))


def _patch_file_matches(attrs, record: SlideRecord, settings: PreprocessSettings) -> bool:
    """A finished patch file is reused only for the same slide file and the same patch settings."""
    def close(key, value):
        stored = attrs.get(key)
        return stored is not None and value is not None and abs(float(stored) - float(value)) < 1e-6

    return (
        str(attrs.get("slide_fingerprint", "")) == slide_fingerprint(record.path)
        and close("patch_size", settings.patch_size)
        and close("target_mpp", settings.target_mpp)
        and close("min_tissue_fraction", settings.min_tissue_fraction)
    )


def _preprocess_open_slide(record, settings, output_dir, h5_path, png_path, start) -> dict:
    if record.path is None:
        raise SlideReadError(f"slide {record.slide_id!r} has no path in the datalist")
    transforms = settings.transforms if settings.transforms is not None else default_slide_transforms(settings)
    data = {"image": str(record.path), "slide_id": record.slide_id, "mpp": record.mpp}
    level_dimensions: list = []
    try:
        data, seconds = run_slide_transforms(transforms, data)
    finally:
        handle = data.get("wsi")
        if handle is not None:
            level_dimensions = list(getattr(handle, "level_dimensions", None) or [])
            handle.close()
    mpp, thumb, mask, mask_ds, grid = data["mpp"], data["thumbnail"], data["tissue_mask"], data["mask_downsample"], data["grid"]
    info = data["tissue_info"]
    warnings = []
    level_mpp = mpp * grid.level_downsample
    if level_mpp > grid.target_mpp * 1.02:
        warnings.append(f"level 0 is {mpp:g} um/px, coarser than the target {grid.target_mpp:g}: patches are upscaled x{grid.scale:.2f}")
    attrs = dict(grid.attrs(), mpp_source=data.get("mpp_source"), backend=data.get("backend"), slide_path=str(record.path),
                 slide_fingerprint=slide_fingerprint(record.path),
                 slide_id=record.slide_id, tissue_area_mm2=round(info["tissue_area_mm2"], 4),
                 min_tissue_fraction=settings.min_tissue_fraction)
    if level_dimensions:  # CLAM's level_dim / TRIDENT's level0_width, level0_height (scripts.formats.patch_file)
        attrs.update(level0_width=int(level_dimensions[0][0]), level0_height=int(level_dimensions[0][1]))
    read_level_dim = level_dimensions[grid.level] if grid.level < len(level_dimensions) else None
    n = len(grid.coords)
    if n == 0:
        status = "no_tissue"
        warnings.insert(0, f"no patch reaches a tissue fraction of {settings.min_tissue_fraction:g} "
                           f"(tissue area {info['tissue_area_mm2']:.3f} mm2); no patch file written for this slide")
        if h5_path.exists():
            h5_path.unlink()  # a stale bag from an earlier run must not be used
    else:
        status = "ok"
        write_patch_file(h5_path, grid.coords, attrs, level_dim=read_level_dim)
    if settings.preview:
        save_preview(png_path, thumb, mask, mask_ds, grid.coords, grid.patch_size_level0, settings.preview_size,
                     title=f"{record.slide_id}: {n} patches")
    return _row(
        record, status=status, warning="; ".join(warnings), mpp=mpp, mpp_source=data.get("mpp_source"),
        backend=data.get("backend"), level=grid.level, level_downsample=round(grid.level_downsample, 6),
        read_size_level=grid.read_size_level, scale=round(grid.scale, 6), n_patches=n,
        tissue_area_mm2=round(info["tissue_area_mm2"], 4), seconds=round(time.perf_counter() - start, 3),
        seconds_read=round(seconds.get("read", 0.0), 3), seconds_tissue=round(seconds.get("tissue", 0.0), 3),
        seconds_grid=round(seconds.get("grid", 0.0), 3),
        patch_file=str(h5_path) if n else "", preview=str(png_path) if settings.preview else "",
    )


def _worker_init() -> None:
    logging.getLogger().setLevel(logging.WARNING)


class PreprocessWorkflow:
    """Validate the datalist, patch every slide in worker processes, write the summary CSV."""

    def __init__(
        self,
        datalist: str | Path,
        output_dir: str | Path,
        settings: PreprocessSettings | None = None,
        num_workers: int = 2,
        start_method: str | None = None,
        progress: bool = True,
    ):
        self.datalist = Path(datalist)
        self.output_dir = Path(output_dir)
        self.settings = settings or PreprocessSettings()
        self.num_workers = int(num_workers)
        # fork shares the parent's loaded libraries (MONAI, ITK: seconds per process); spawn elsewhere
        self.start_method = start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
        self.progress = progress

    def run(self) -> list[dict]:
        started = time.perf_counter()
        records = load_datalist(self.datalist, require_labels=False, check_files=True, require_slides=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        settings = self.settings
        if "cucim" in settings.backends:
            paths = [str(r.path) for r in records if r.path is not None]
            settings.cucim_verdicts = probe_cucim(paths)
            refused = [Path(p).name for p, (ok, _) in settings.cucim_verdicts.items() if not ok]
            if refused:
                logger.info("cuCIM cannot read %d file(s), using fallbacks: %s", len(refused), ", ".join(refused))
        rows: dict[str, dict] = {}
        if self.num_workers <= 0:
            for record in self._bar(records):
                rows[record.slide_id] = preprocess_slide(record, settings, self.output_dir)
        else:
            self._run_pool(records, settings, rows)
        ordered = [rows[r.slide_id] for r in records]
        summary = OutputLayout(self.output_dir).preprocess_summary
        write_csv(summary, ordered, SUMMARY_COLUMNS)
        counts = {s: sum(r["status"] == s for r in ordered) for s in ("ok", "no_tissue", "failed")}
        for row in ordered:
            if row["status"] != "ok":
                logger.warning("%s %s: %s", row["slide_id"], row["status"], row["error"] or row["warning"])
        logger.info(
            "preprocessed %d slide(s) in %.1f s: %d ok (%d patches), %d no tissue, %d failed; summary: %s",
            len(ordered), time.perf_counter() - started, counts["ok"],
            sum(int(r["n_patches"] or 0) for r in ordered if r["status"] == "ok"), counts["no_tissue"],
            counts["failed"], summary,
        )
        raise_if_all_failed(ordered, "preprocessing", summary)
        return ordered

    def _bar(self, items, total=None):
        return tqdm(items, total=total, desc="preprocess", unit="slide", disable=not self.progress, file=sys.stderr)

    def _run_pool(self, records, settings, rows) -> None:
        if self.start_method == "fork":
            # load ITK once, before forking, so workers start instantly (MONAI's readers came with this module)
            if settings.tissue.backend == "itk" or settings.transforms is not None:
                warm_up_itk()
        context = multiprocessing.get_context(self.start_method)
        todo = list(records)
        retry: list[SlideRecord] = []
        bar = self._bar(None, total=len(records))
        workers = max(1, min(self.num_workers, len(todo)))
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
            futures = {pool.submit(preprocess_slide, r, settings, self.output_dir): r for r in todo}
            for future in as_completed(futures):
                record = futures[future]
                try:
                    rows[record.slide_id] = future.result()
                    bar.update(1)
                except BrokenProcessPool:
                    retry.append(record)
        for record in retry:  # alone in a fresh process, so a crash is attributed to its slide
            with ProcessPoolExecutor(1, mp_context=context, initializer=_worker_init) as pool:
                try:
                    rows[record.slide_id] = pool.submit(preprocess_slide, record, settings, self.output_dir).result()
                except BrokenProcessPool:
                    rows[record.slide_id] = _row(
                        record, status="failed",
                        error=f"slide {record.slide_id!r}: a slide reader crashed the worker process; try "
                              f"backends without 'cucim' or convert the file (e.g. to a JPEG-tiled pyramidal TIFF)",
                    )
            bar.update(1)
        bar.close()


def run(datalist: str, output_dir: str, **overrides) -> None:
    """Command-line entry without the bundle config: ``python -m scripts.workflows.preprocess run --datalist ...``
    (keyword overrides: any PreprocessSettings or TissueParams field, and num_workers)."""
    tissue_keys = set(TissueParams.__dataclass_fields__)
    tissue = TissueParams(**{k: overrides.pop(k) for k in list(overrides) if k in tissue_keys})
    num_workers = overrides.pop("num_workers", 2)
    settings = PreprocessSettings(tissue=tissue, **overrides)
    PreprocessWorkflow(datalist, output_dir, settings, num_workers=num_workers).run()


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire({"run": run})
