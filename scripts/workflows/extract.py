"""Feature extraction workflow: patch coordinates -> frozen encoder -> one HDF5 feature file per slide.

Reads ``<output_dir>/patches/<slide_id>.h5`` (written by preprocessing) and writes
``<output_dir>/features/<slide_id>.h5``:

  ``features`` (N, D) float32, ``coords`` (N, 2) - the patch file's coordinates, same order;
  attrs ``encoder``, ``weights_sha256`` ("random" for random weights), ``patch_size``, ``mpp``, ...

and ``<output_dir>/extract_summary.csv`` (slide_id, status, error, n_patches, seconds, patches_per_s,
encoder, weights_sha256 - "random" marks features from random weights).

Behaviour
* Each slide runs the per-slide transforms configs/extract.json declares (``extract_transforms``: open the
  slide with the reader component, read the patches in batches; ``encoder_transform``: the encoder's resize
  and normalisation), so a step is swapped with a one-line override. A read-ahead thread
  (:class:`scripts.transforms.prefetch.SlidePrefetcher`) runs them for the next batches, also of the next
  slide, while the encoder runs; :func:`extract_slide` encodes and writes one slide, the workflow is a loop.
* Every file is written to a temporary name and renamed when complete. A re-run skips slides whose feature
  file is complete and matches the patch file and the encoder; a slide interrupted mid-way (its temporary
  file left behind by a killed process) is extracted again from scratch.
* One failing slide is reported (status ``failed`` and the error) and the others go on.
* Under ``torchrun`` (WORLD_SIZE > 1) the slide list is sharded by rank (gloo on CPU, nccl on GPU); each
  rank writes only its own slides and rank 0 writes the merged summary.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np
import torch
import torch.distributed as dist
from monai.transforms import Compose
from tqdm.auto import tqdm

from scripts.data.datalist import load_datalist
from scripts.formats.feature_file import FeatureWriter, load_features, write_pt_file
from scripts.formats.feature_file import feature_file_is_complete as _feature_file_is_complete
from scripts.formats.layout import OutputLayout
from scripts.formats.patch_file import PatchFile, PatchFileError, find_patch_file, slide_fingerprint
from scripts.formats.patch_file import read_patch_file as read_coordinate_file
from scripts.networks.encoders import Encoder, resolve_precision
from scripts.transforms import EncoderInputd, OpenSlided, ReadPatchesd
from scripts.transforms.prefetch import SlidePrefetcher, slide_items
from scripts.utils.errors import raise_if_all_failed
from scripts.utils.io_utils import write_csv
from scripts.wsi.open import DEFAULT_BACKENDS
from scripts.wsi.patches import warm_up
from scripts.wsi.reader import SlideWSIReader

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["slide_id", "status", "error", "n_patches", "seconds", "patches_per_s", "encoder", "weights_sha256"]


@dataclass
class PatchInfo:
    slide_id: str
    slide_path: Path
    coords: np.ndarray  # (N, 2) level-0 x, y, exactly as stored
    level: int
    read_size: int  # pixels read at ``level``
    patch_size: int  # output pixels (before the encoder's own resize)
    mpp: float | None
    target_mpp: float | None
    patch: PatchFile | None = None  # the file's full description (attributes copied into the feature file)


def read_patch_file(path: str | Path, slide_path: str | Path | None = None) -> PatchInfo:
    """Read a patch file (bundle, CLAM, TRIDENT or generic layout: :mod:`scripts.formats.patch_file`) and
    pair it with its slide (``slide_path``, else the file's ``slide_path`` attribute)."""
    path = Path(path)
    known = read_coordinate_file(path)
    slide = slide_path if slide_path not in (None, "") else known.attrs.get("slide_path")
    if not slide:
        raise PatchFileError(f"patch file {path}: no slide path (neither in the datalist nor attribute slide_path)")
    slide_id = path.name[: -len("_patches.h5")] if path.name.endswith("_patches.h5") else path.stem
    return PatchInfo(slide_id, Path(str(slide)), known.coords, known.level, known.read_size_level,
                     known.patch_size, known.mpp, known.target_mpp, known)


def feature_file_is_complete(path: Path, coords: np.ndarray, encoder: Encoder, slide_path=None) -> bool:
    """True when ``path`` holds features of every patch in ``coords`` from this very encoder and weights
    (and, when ``slide_path`` is given, from the slide file as it is now)."""
    if not _feature_file_is_complete(path, coords, encoder.name, encoder.weights_sha256, encoder.feature_dim,
                                     None if slide_path is None else slide_fingerprint(slide_path)):
        return False
    wanted = getattr(encoder, "precision", "auto")
    if wanted in ("bf16", "fp32"):  # features of the other precision are extracted again
        with h5py.File(path, "r") as h5:
            stored = h5.attrs.get("precision")
        stored = stored.decode() if isinstance(stored, bytes) else stored
        if stored not in (None, "", "None") and str(stored) != wanted:
            return False
    return True


def remove_stale_temporaries(final: Path) -> int:
    """Delete temporary files a killed run left for ``final`` (atomic_path names them .<stem>.XXXXXXXX.tmp.h5)."""
    pattern = re.compile(rf"^\.{re.escape(final.stem)}\.[A-Za-z0-9_]{{8}}\.tmp{re.escape(final.suffix)}$")
    removed = 0
    if final.parent.is_dir():
        for candidate in final.parent.iterdir():
            if pattern.match(candidate.name):
                candidate.unlink(missing_ok=True)
                removed += 1
    return removed


def _SlideWriter(final: Path, info: PatchInfo, encoder: Encoder, reader_backend: str, rank: int = 0, world: int = 1,
                 precision: str | None = None, pt_file: Path | None = None) -> FeatureWriter:
    """An open temporary feature file for one slide (:class:`scripts.formats.feature_file.FeatureWriter`)."""
    attrs = {
        "encoder": encoder.name, "weights_sha256": encoder.weights_sha256,
        "patch_size": info.patch_size, "mpp": info.mpp, "target_mpp": info.target_mpp,
        "level": info.level, "read_size": info.read_size, "input_size": encoder.input_size,
        "precision": precision, "slide_id": info.slide_id, "name": info.slide_id, "slide_path": str(info.slide_path),
        "reader": reader_backend, "slide_fingerprint": slide_fingerprint(info.slide_path),
        "rank": rank, "world_size": world,
    }
    return FeatureWriter(final, info.coords, encoder.feature_dim, attrs, info.patch, pt_file)


def reader_backends(reader_backend: str | Sequence[str]) -> tuple[str, ...]:
    """``reader_backend`` ("auto", one backend name, or a list) -> the backends ``PatchReader`` tries, in order."""
    names = (reader_backend,) if isinstance(reader_backend, str) else tuple(reader_backend)
    if names == ("auto",):
        return DEFAULT_BACKENDS
    unknown = [n for n in names if n not in DEFAULT_BACKENDS]
    if unknown or not names:
        raise ValueError(f"reader_backend {reader_backend!r}: choose 'auto' or from {DEFAULT_BACKENDS}")
    return names


def default_slide_transforms(reader=None, batch_size: int = 32, num_workers: int = 2,
                             backends: Sequence[str] = DEFAULT_BACKENDS):
    """The ``extract_transforms`` configs/extract.json declares: ``OpenSlided`` (the slide opened by the reader
    component, ``SlideWSIReader`` over ``backends`` when ``reader`` is None) then ``ReadPatchesd`` (batches)."""
    reader = reader if reader is not None else SlideWSIReader(backends, require_mpp=False)
    return Compose([OpenSlided("image", reader=reader),
                    ReadPatchesd("wsi", batch_size=batch_size, num_workers=num_workers)])


def slide_input(info: PatchInfo) -> dict:
    """The dictionary a slide's transforms start from: the slide path and its patch file's grid."""
    return {"image": str(info.slide_path), "slide_id": info.slide_id, "coords": info.coords, "level": info.level,
            "read_size": info.read_size, "patch_size": info.patch_size}


def _new_row(slide_id: str, encoder: Encoder) -> dict:
    return {"slide_id": slide_id, "status": "", "error": "", "n_patches": 0, "seconds": 0.0,
            "patches_per_s": 0.0, "encoder": encoder.name, "weights_sha256": encoder.weights_sha256}


def _fail(row: dict, exc: BaseException) -> None:
    row["status"] = "failed"
    row["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
    logger.error("%s failed: %s", row["slide_id"], row["error"])


def plan_slide(record, encoder: Encoder, output_dir: str | Path, overwrite: bool = False,
               write_pt_files: bool = False) -> tuple[dict, PatchInfo | None]:
    """The slide's summary row and its patch grid when it needs extracting; ``(row, None)`` when the row is
    already final: ``skipped`` (a complete feature file from this slide file and encoder exists),
    ``precomputed`` (no slide path, features given) or ``failed`` (no patch file, ...). Never raises."""
    layout = OutputLayout(output_dir)
    row = _new_row(record.slide_id, encoder)
    final = layout.features_dir / f"{record.slide_id}.h5"
    try:
        if record.path is None:
            row["status"] = "precomputed" if record.features else "failed"
            row["error"] = "" if record.features else "no slide path in the datalist"
            return row, None
        patch_path = find_patch_file(record.slide_id, [layout.patches_dir]) or layout.patches_dir / f"{record.slide_id}.h5"
        info = read_patch_file(patch_path, record.path)
        row["n_patches"] = len(info.coords)
        if not overwrite and feature_file_is_complete(final, info.coords, encoder, info.slide_path):
            row["status"] = "skipped"
            pt_file = Path(output_dir) / "pt_files" / f"{record.slide_id}.pt"
            if write_pt_files and not pt_file.is_file():
                write_pt_file(pt_file, load_features(final))
            return row, None
        if remove_stale_temporaries(final):
            logger.info("%s: removed the temporary file of an interrupted run; extracting again", record.slide_id)
        return row, info
    except Exception as exc:  # noqa: BLE001 - one slide never stops the batch
        _fail(row, exc)
        return row, None


@dataclass
class PreparedSlide:
    """A slide whose reading is under way: its row and grid (:func:`plan_slide`) and its items
    (``("start", backend)``, then ``("batch", uint8 patches)``: :mod:`scripts.transforms.prefetch`)."""

    row: dict
    info: PatchInfo
    items: Iterator


class FeatureExtractionWorkflow:
    """Extract features for every slide of a datalist (the ``run`` of configs/extract.json): a loop over
    :func:`extract_slide` with resume, one summary row per slide, read-ahead across slides and torchrun
    sharding.

    Args:
        datalist: CSV (slide_id, path, ...); labels are not needed.
        output_dir: the shared output folder (reads patches/, writes features/ and extract_summary.csv).
        encoder: an ``Encoder`` from ``scripts.networks.encoders.build_encoder``.
        device: torch device.
        precision: encoder arithmetic: "bf16" (autocast, on CUDA or CPU), "fp32", or "auto" (bf16 on CUDA,
            fp32 on CPU); stamped into every feature file (attribute ``precision``).
        batch_size: patches per encoder batch (and per read batch of the default transforms).
        num_workers: reader threads (cuCIM's thread pool / decoding threads) of the default transforms.
        prefetch_batches: read-ahead depth (batches waiting in memory, across slides).
        reader: the WSI reader component (``scripts.wsi.reader.SlideWSIReader``, declared in
            configs/extract.json); its backends, in its order, open the slides (overrides ``reader_backend``).
        reader_backend: "auto" (cuCIM behind its crash-safe probe, then OpenSlide, tifffile, DICOM: see
            ``scripts.wsi.open``) or one of "cucim", "openslide", "tifffile", "dicom".
        slide_transforms: per-slide transforms (configs/extract.json ``extract_transforms``: a Compose of
            ``OpenSlided`` and ``ReadPatchesd``); None builds that default from ``reader``.
        encoder_transform: uint8 batch -> encoder input (``EncoderInputd``); None: the encoder's own.
        num_threads: torch CPU threads (0: torch's default, divided among ranks sharing a CPU machine).
        overwrite: extract again even when a complete feature file exists.
        compile: ``torch.compile`` the encoder (worth it on a GPU for large cohorts).
        distributed: "auto" (use torch.distributed when WORLD_SIZE > 1), True or False.
        progress: show a tqdm bar (patches/s).
        write_pt_files: also write CLAM's ``<output_dir>/pt_files/<slide_id>.pt`` (the features tensor).
    """

    def __init__(
        self,
        datalist: str | Path,
        output_dir: str | Path,
        encoder: Encoder,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        num_workers: int = 2,
        prefetch_batches: int = 4,
        reader_backend: str = "auto",
        num_threads: int = 0,
        overwrite: bool = False,
        compile: bool = False,
        distributed: str | bool = "auto",
        progress: bool = True,
        write_pt_files: bool = False,
        precision: str = "auto",
        reader=None,
        slide_transforms: Callable[[dict], dict] | None = None,
        encoder_transform: Callable[[dict], dict] | None = None,
    ):
        self.datalist = Path(datalist)
        self.output_dir = Path(output_dir)
        self.encoder = encoder
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.prefetch_batches = max(1, int(prefetch_batches))
        self.reader_backend = reader_backend
        self.backends = reader_backends(reader_backend)
        if reader is not None:  # the WSI reader component (scripts.wsi.reader.SlideWSIReader): its fallback chain
            self.backends = tuple(reader.backends)
        self.slide_transforms = slide_transforms or default_slide_transforms(reader, self.batch_size,
                                                                             self.num_workers, self.backends)
        self.encoder_transform = encoder_transform
        self.num_threads = int(num_threads)
        self.overwrite = bool(overwrite)
        self.compile = bool(compile)
        self.distributed = distributed
        self.progress = bool(progress)
        self.write_pt_files = _flag(write_pt_files)

        self.precision = resolve_precision(precision, self.device.type)  # bf16 / fp32, fails early on a typo
        self.encoder.precision = self.precision

    # ------------------------------------------------------------------------------------- entry
    def run(self) -> list[dict]:
        records = load_datalist(self.datalist, require_labels=False, check_files=False, require_slides=False)
        rank, world, created_group = self._init_distributed()
        try:
            mine = records[rank::world]
            configure_torch(self.device, self.num_threads, world)
            rows = self.extract_records(mine, rank, world)
            all_rows = rows
            if world > 1:
                gathered: list = [None] * world
                torch.distributed.all_gather_object(gathered, rows)
                all_rows = [row for part in gathered for row in part]
            if rank == 0:
                order = {r.slide_id: i for i, r in enumerate(records)}
                all_rows.sort(key=lambda row: order.get(row["slide_id"], len(order)))
                write_csv(OutputLayout(self.output_dir).extract_summary, all_rows, SUMMARY_COLUMNS)
                self._log_totals(all_rows)
            if world > 1:
                torch.distributed.barrier()
            raise_if_all_failed(all_rows, "feature extraction", OutputLayout(self.output_dir).extract_summary)
            return all_rows
        finally:
            if created_group:
                torch.distributed.destroy_process_group()

    def _init_distributed(self) -> tuple[int, int, bool]:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        wanted = self.distributed if self.distributed != "auto" else world > 1
        if not wanted or world <= 1:
            return 0, 1, False

        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), False
        if self.device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if self.device.index is None or self.device.index != local_rank:
                self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
        logger.info("rank %d/%d (%s) on %s", dist.get_rank(), dist.get_world_size(), backend, self.device)
        return dist.get_rank(), dist.get_world_size(), True

    # ---------------------------------------------------------------------------------- the loop
    def extract_records(self, records, rank: int = 0, world: int = 1) -> list[dict]:
        """Extract ``records`` (this rank's share) in order, reading ahead across slides; one summary row per
        record. Never raises for a bad slide (its row says ``failed`` and why)."""
        OutputLayout(self.output_dir).features_dir.mkdir(parents=True, exist_ok=True)
        plans = [plan_slide(record, self.encoder, self.output_dir, self.overwrite, self.write_pt_files)
                 for record in records]
        skipped = sum(row["status"] == "skipped" for row, _ in plans)
        if skipped:
            logger.info("%d slide(s) already extracted, skipped (overwrite=true re-extracts them)", skipped)
        jobs = [(row, info) for row, info in plans if info is not None]
        if not jobs:
            return [row for row, _ in plans]
        self.encoder.to(self.device)
        if self.compile:
            self.encoder.model = torch.compile(self.encoder.model)
        warm_up([info.slide_path for _, info in jobs], self.backends)  # the cuCIM probe, before any thread
        bar = None
        if self.progress:
            bar = tqdm(total=sum(len(info.coords) for _, info in jobs), unit="patch", dynamic_ncols=True,
                       desc="extract" if world == 1 else f"extract rank {rank}", position=rank if world > 1 else None)
        try:
            with SlidePrefetcher([slide_input(info) for _, info in jobs], self.slide_transforms,
                                 self.prefetch_batches) as ahead:
                for index, (row, info) in enumerate(jobs):
                    if bar is not None:
                        bar.set_postfix_str(info.slide_id, refresh=False)
                    extract_slide(None, self.encoder, self.output_dir, self.device, precision=self.precision,
                                  encoder_transform=self.encoder_transform, write_pt_files=self.write_pt_files,
                                  prepared=PreparedSlide(row, info, ahead.items(index)), rank=rank, world=world,
                                  on_batch=None if bar is None else bar.update)
        finally:
            if bar is not None:
                bar.close()
        return [row for row, _ in plans]

    @staticmethod
    def _log_totals(rows: list[dict]) -> None:
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        logger.info("feature extraction: %s", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


def _flag(value) -> bool:
    """A true/false option; on the command line ``false`` arrives as the string "false"."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "")
    return bool(value)


def configure_torch(device: str | torch.device, num_threads: int = 0, world: int = 1) -> None:
    """CPU threads for the encoder: ``num_threads`` when > 0, else torch's default, divided among the ranks
    sharing this machine under torchrun. Nothing to do on a GPU."""
    if torch.device(device).type != "cpu":
        return
    threads = int(num_threads)
    if threads <= 0 and world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        threads = max(1, (os.cpu_count() or 1) // max(1, local))
    if threads > 0:
        torch.set_num_threads(threads)


def extract_slide(
    record,
    encoder: Encoder,
    output_dir: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    num_workers: int = 2,
    reader_backend: str | Sequence[str] = "auto",
    overwrite: bool = False,
    progress: bool = False,
    precision: str = "auto",
    *,
    slide_transforms: Callable[[dict], dict] | None = None,
    encoder_transform: Callable[[dict], dict] | None = None,
    write_pt_files: bool = False,
    prepared: PreparedSlide | None = None,
    rank: int = 0,
    world: int = 1,
    on_batch: Callable[[int], object] | None = None,
) -> dict:
    """Features of one slide (a :class:`scripts.data.datalist.SlideRecord`): reads
    ``<output_dir>/patches/<slide_id>.h5``, writes ``<output_dir>/features/<slide_id>.h5`` atomically and
    returns the slide's ``extract_summary.csv`` row (status ``ok``, ``skipped`` when a complete file from the
    same slide file and encoder exists, ``empty``, ``precomputed`` or ``failed`` with the error).

    The slide is opened and read by ``slide_transforms`` (default :func:`default_slide_transforms` over
    ``reader_backend``, ``batch_size``, ``num_workers``) and each batch goes through ``encoder_transform``
    (default ``EncoderInputd`` with the encoder's own preprocessing) and ``encoder.embed``.
    ``prepared`` (from :class:`FeatureExtractionWorkflow`'s read-ahead) replaces the planning and reading:
    ``record`` is then unused. ``on_batch(n)`` is called after each batch of ``n`` patches (progress).
    """
    device = torch.device(device)
    encoder.precision = resolve_precision(precision, device.type)
    bar = None
    if prepared is None:
        row, info = plan_slide(record, encoder, output_dir, overwrite, _flag(write_pt_files))
        if info is None:
            return row
        transforms = slide_transforms or default_slide_transforms(None, batch_size, num_workers,
                                                                  reader_backends(reader_backend))
        prepared = PreparedSlide(row, info, slide_items(transforms, slide_input(info)))
        if progress and on_batch is None:
            bar = tqdm(total=len(info.coords), unit="patch", desc=info.slide_id, dynamic_ncols=True, leave=False)
            on_batch = bar.update
        encoder.to(device)
    row, info = prepared.row, prepared.info
    to_input = encoder_transform or EncoderInputd("patches", encoder=encoder)
    final = OutputLayout(output_dir).features_dir / f"{info.slide_id}.h5"
    final.parent.mkdir(parents=True, exist_ok=True)
    pt_file = Path(output_dir) / "pt_files" / f"{info.slide_id}.pt" if _flag(write_pt_files) else None
    writer: FeatureWriter | None = None
    started = time.perf_counter()
    try:
        for kind, payload in prepared.items:
            if kind == "start":
                writer = _SlideWriter(final, info, encoder, payload, rank, world, precision=str(encoder.precision),
                                      pt_file=pt_file)
                continue
            batch = torch.as_tensor(payload).to(device, non_blocking=True)  # (CUDA tensors when decoded there)
            feats = encoder.embed(to_input({"patches": batch})["patches"])
            writer.write(feats.cpu().numpy())
            if on_batch is not None:
                on_batch(len(payload))
        if writer is None:
            raise RuntimeError(f"{info.slide_path}: the slide transforms read nothing (no 'start' item)")
        writer.commit()
        writer = None
        seconds = time.perf_counter() - started
        n = len(info.coords)
        row.update(status="ok" if n else "empty", seconds=round(seconds, 3),
                   patches_per_s=round(n / seconds, 2) if seconds > 0 and n else 0.0,
                   error="" if n else "the patch file has no patches")
    except Exception as exc:  # noqa: BLE001 - one slide never stops the batch
        if writer is not None:
            writer.abort()
        row["seconds"] = round(time.perf_counter() - started, 3)
        _fail(row, exc)
    finally:
        close = getattr(prepared.items, "close", None)
        if close is not None:
            close()  # a slide abandoned half-way: its opened file is closed, its queued batches skipped
        if bar is not None:
            bar.close()
    return row
