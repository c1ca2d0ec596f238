"""Feature extraction workflow: patch coordinates -> frozen encoder -> one HDF5 feature file per slide.

Reads ``<output_dir>/patches/<slide_id>.h5`` (written by preprocessing) and writes
``<output_dir>/features/<slide_id>.h5``:

  ``features`` (N, D) float32, ``coords`` (N, 2) - the patch file's coordinates, same order;
  attrs ``encoder``, ``weights_sha256`` ("random" for random weights), ``patch_size``, ``mpp``, ...

and ``<output_dir>/extract_summary.csv`` (slide_id, status, error, n_patches, seconds, patches_per_s,
encoder, weights_sha256 - "random" marks features from random weights).

Behaviour
* A reader thread reads and decodes the next batches (also of the next slide) while the encoder runs.
* Every file is written to a temporary name and renamed when complete. A re-run skips slides whose feature
  file is complete and matches the patch file and the encoder; a slide interrupted mid-way (its temporary
  file left behind by a killed process) is extracted again from scratch.
* One failing slide is reported (status ``failed`` and the error) and the others go on.
* Under ``torchrun`` (WORLD_SIZE > 1) the slide list is sharded by rank (gloo on CPU, nccl on GPU); each
  rank writes only its own slides and rank 0 writes the merged summary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from scripts.datalist import load_datalist
from scripts.io_utils import atomic_path, write_csv
from scripts.networks.encoders import Encoder
from scripts.formats.feature_file import FeatureWriter, load_features, write_pt_file
from scripts.formats.feature_file import feature_file_is_complete as _feature_file_is_complete
from scripts.formats.patch_file import PatchFile, PatchFileError, find_patch_file
from scripts.formats.patch_file import read_patch_file as read_coordinate_file
from scripts.formats.patch_file import slide_fingerprint
from scripts.wsi.reader import DEFAULT_BACKENDS, PatchReader, warm_up

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
    return _feature_file_is_complete(path, coords, encoder.name, encoder.weights_sha256, encoder.feature_dim,
                                     None if slide_path is None else slide_fingerprint(slide_path))


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


class FeatureExtractionWorkflow:
    """Extract features for every slide of a datalist (the ``run`` of configs/extract.json).

    Args:
        datalist: CSV (slide_id, path, ...); labels are not needed.
        output_dir: the shared output folder (reads patches/, writes features/ and extract_summary.csv).
        encoder: an ``Encoder`` from ``scripts.networks.encoders.build_encoder``.
        device: torch device (CUDA: bf16 autocast; CPU: fp32).
        batch_size: patches per encoder batch (and per read batch).
        num_workers: reader threads (cuCIM's thread pool / decoding threads).
        prefetch_batches: read-ahead depth of the reader thread.
        reader_backend: "auto" (cuCIM behind its crash-safe probe, then OpenSlide, tifffile, DICOM: see
            ``scripts.wsi.reader``) or one of "cucim", "openslide", "tifffile", "dicom".
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
        self.num_threads = int(num_threads)
        self.overwrite = bool(overwrite)
        self.compile = bool(compile)
        self.distributed = distributed
        self.progress = bool(progress)
        self.write_pt_files = _flag(write_pt_files)

    # ------------------------------------------------------------------------------------- entry
    def run(self) -> list[dict]:
        records = load_datalist(self.datalist, require_labels=False, check_files=False, require_slides=False)
        rank, world, created_group = self._init_distributed()
        try:
            mine = records[rank::world]
            self._configure_torch(world)
            rows = self._extract(mine, rank, world)
            all_rows = rows
            if world > 1:
                gathered: list = [None] * world
                torch.distributed.all_gather_object(gathered, rows)
                all_rows = [row for part in gathered for row in part]
            if rank == 0:
                order = {r.slide_id: i for i, r in enumerate(records)}
                all_rows.sort(key=lambda row: order.get(row["slide_id"], len(order)))
                write_csv(self.output_dir / "extract_summary.csv", all_rows, SUMMARY_COLUMNS)
                self._log_totals(all_rows)
            if world > 1:
                torch.distributed.barrier()
            return all_rows
        finally:
            if created_group:
                torch.distributed.destroy_process_group()

    def _init_distributed(self) -> tuple[int, int, bool]:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        wanted = self.distributed if self.distributed != "auto" else world > 1
        if not wanted or world <= 1:
            return 0, 1, False
        import torch.distributed as dist

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

    def _configure_torch(self, world: int) -> None:
        if self.device.type != "cpu":
            return
        threads = self.num_threads
        if threads <= 0 and world > 1:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            threads = max(1, (os.cpu_count() or 1) // max(1, local))
        if threads > 0:
            torch.set_num_threads(threads)

    # ---------------------------------------------------------------------------------- the work
    def _extract(self, records, rank: int, world: int) -> list[dict]:
        features_dir = self.output_dir / "features"
        features_dir.mkdir(parents=True, exist_ok=True)
        rows: dict[str, dict] = {}
        jobs: list[PatchInfo] = []
        for record in records:
            row = {"slide_id": record.slide_id, "status": "", "error": "", "n_patches": 0, "seconds": 0.0,
                   "patches_per_s": 0.0, "encoder": self.encoder.name, "weights_sha256": self.encoder.weights_sha256}
            rows[record.slide_id] = row
            final = features_dir / f"{record.slide_id}.h5"
            try:
                if record.path is None:
                    row["status"] = "precomputed" if record.features else "failed"
                    row["error"] = "" if record.features else "no slide path in the datalist"
                    continue
                patches = self.output_dir / "patches"
                patch_path = find_patch_file(record.slide_id, [patches]) or patches / f"{record.slide_id}.h5"
                info = read_patch_file(patch_path, record.path)
                row["n_patches"] = len(info.coords)
                if not self.overwrite and feature_file_is_complete(final, info.coords, self.encoder, info.slide_path):
                    row["status"] = "skipped"
                    pt_file = self.output_dir / "pt_files" / f"{record.slide_id}.pt"
                    if self.write_pt_files and not pt_file.is_file():
                        write_pt_file(pt_file, load_features(final))
                    continue
                if remove_stale_temporaries(final):
                    logger.info("%s: removed the temporary file of an interrupted run; extracting again", record.slide_id)
                jobs.append(info)
            except Exception as exc:  # noqa: BLE001 - one slide never stops the batch
                self._fail(row, exc)
        skipped = sum(r["status"] == "skipped" for r in rows.values())
        if skipped:
            logger.info("%d slide(s) already extracted, skipped (overwrite=true re-extracts them)", skipped)
        if jobs:
            self._run_jobs(jobs, rows, features_dir, rank, world)
        return list(rows.values())

    def _run_jobs(self, jobs: list[PatchInfo], rows: dict, features_dir: Path, rank: int, world: int) -> None:
        model = self.encoder.to(self.device)
        if self.compile:
            model.model = torch.compile(model.model)
        warm_up([job.slide_path for job in jobs], self.backends)
        total = sum(len(j.coords) for j in jobs)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            desc = "extract" if world == 1 else f"extract rank {rank}"
            bar = tqdm(total=total, unit="patch", desc=desc, dynamic_ncols=True, position=rank if world > 1 else None)
        stop = threading.Event()
        items: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        producer = threading.Thread(target=self._produce, args=(jobs, items, stop), daemon=True, name="patch-reader")
        producer.start()
        writer: _SlideWriter | None = None
        current: PatchInfo | None = None
        started = 0.0
        try:
            while True:
                kind, index, payload = items.get()
                if kind == "done":
                    break
                info = jobs[index]
                row = rows[info.slide_id]
                if row["status"] == "failed":  # the encoder already failed on this slide: drain its batches
                    continue
                try:
                    if kind == "start":
                        current, started = info, time.perf_counter()
                        pt_file = self.output_dir / "pt_files" / f"{info.slide_id}.pt" if self.write_pt_files else None
                        precision = getattr(self, "precision", None) or ("bf16" if self.device.type == "cuda" else "fp32")
                        writer = _SlideWriter(features_dir / f"{info.slide_id}.h5", info, self.encoder, payload, rank,
                                              world, precision=str(precision), pt_file=pt_file)
                        if bar is not None:
                            bar.set_postfix_str(info.slide_id, refresh=False)
                    elif kind == "batch":
                        feats = self.encoder(torch.from_numpy(payload).to(self.device, non_blocking=True))
                        writer.write(feats.cpu().numpy())
                        if bar is not None:
                            bar.update(len(payload))
                    elif kind == "end":
                        writer.commit()
                        writer = None
                        seconds = time.perf_counter() - started
                        n = len(info.coords)
                        row.update(status="ok" if n else "empty", seconds=round(seconds, 3),
                                   patches_per_s=round(n / seconds, 2) if seconds > 0 and n else 0.0,
                                   error="" if n else "the patch file has no patches")
                    elif kind == "error":
                        if current is not info:  # the slide could not even be opened
                            current, started = info, time.perf_counter()
                        raise payload
                except Exception as exc:  # noqa: BLE001 - one slide never stops the batch
                    if writer is not None:
                        writer.abort()
                        writer = None
                    row["seconds"] = round(time.perf_counter() - started, 3)
                    self._fail(row, exc)
        finally:
            stop.set()
            if writer is not None:
                writer.abort()
            with contextlib.suppress(queue.Empty):  # unblock the producer
                while True:
                    items.get_nowait()
            producer.join(timeout=10)
            if bar is not None:
                bar.close()

    def _produce(self, jobs: list[PatchInfo], items: queue.Queue, stop: threading.Event) -> None:
        """Reader thread: (start, batch..., end) or (start, ..., error) per slide, then done."""

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        for index, info in enumerate(jobs):
            if stop.is_set():
                return
            try:
                reader = PatchReader(info.slide_path, self.backends, slide_id=info.slide_id)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, reported per slide
                put(("error", index, exc))
                continue
            try:
                if not put(("start", index, reader.backend)):
                    return
                for batch, _ in reader.batches(info.coords, info.read_size, info.level, info.patch_size,
                                               self.batch_size, self.num_workers):
                    if not put(("batch", index, batch)):
                        return
                put(("end", index, None))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, reported per slide
                put(("error", index, exc))
            finally:
                reader.close()
        put(("done", -1, None))

    @staticmethod
    def _fail(row: dict, exc: BaseException) -> None:
        row["status"] = "failed"
        row["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
        logger.error("%s failed: %s", row["slide_id"], row["error"])

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
