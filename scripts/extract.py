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

import h5py
import numpy as np
import torch

from scripts.errors import BundleError
from scripts.datalist import load_datalist
from scripts.formats.layout import OutputLayout
from scripts.io_utils import atomic_path, write_csv
from scripts.networks.encoders import Encoder
from scripts.wsi.patch_file import read_patch_file as read_coordinate_file
from scripts.wsi.patch_file import slide_fingerprint
from scripts.wsi.reader import DEFAULT_BACKENDS, PatchReader, warm_up

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["slide_id", "status", "error", "n_patches", "seconds", "patches_per_s", "encoder", "weights_sha256"]


class PatchFileError(BundleError, ValueError):
    """A patch coordinate file that is missing or lacks what extraction needs."""


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


def read_patch_file(path: str | Path, slide_path: str | Path | None = None) -> PatchInfo:
    """Read a patch file: ``coords`` (N, 2) and the attributes needed to read the patches.

    Files written by this bundle's preprocessing, by CLAM (attributes on ``coords``) and by TRIDENT are
    read through :func:`scripts.wsi.patch_file.read_patch_file`. For other files with a ``coords``
    dataset and a ``patch_size`` attribute:
    The region read at ``level`` is ``read_size_level`` pixels when the file says so, else
    ``patch_size_level0 / level_downsample``, else ``patch_size * target_mpp / (mpp * level_downsample)``,
    rounded.
    """
    path = Path(path)
    if not path.is_file():
        raise PatchFileError(f"patch file {path} not found; run the preprocessing workflow first (configs/preprocess.json)")
    try:  # this bundle's, CLAM's and TRIDENT's layouts, read by the preprocessing module
        known = read_coordinate_file(path)
    except (ValueError, KeyError, TypeError):
        known = None
    if known is not None and known.layout == "trident" and "level" in known.attrs:
        known = None  # a level-0 footprint plus an explicit level: computed below
    if known is not None:
        slide = slide_path if slide_path not in (None, "") else known.attrs.get("slide_path")
        if not slide:
            raise PatchFileError(f"patch file {path}: no slide path (neither in the datalist nor attribute slide_path)")
        return PatchInfo(path.stem, Path(str(slide)), known.coords, known.level, known.read_size_level,
                         known.patch_size, known.mpp, known.target_mpp)
    with h5py.File(path, "r") as h5:
        if "coords" not in h5:
            raise PatchFileError(f"patch file {path} has no 'coords' dataset")
        coords = h5["coords"][()]
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in h5.attrs.items()}
    if coords.ndim != 2 or (coords.size and coords.shape[1] != 2):
        raise PatchFileError(f"patch file {path}: 'coords' must be (N, 2), got {coords.shape}")
    coords = coords.reshape(-1, 2)
    missing = [k for k in ("patch_size",) if k not in attrs]
    if missing:
        raise PatchFileError(f"patch file {path} lacks attribute(s) {missing}")
    patch_size = int(attrs["patch_size"])
    level = int(attrs.get("level", 0))
    downsample = float(attrs.get("level_downsample", 1.0))
    mpp = _float_or_none(attrs.get("mpp"))
    target_mpp = _float_or_none(attrs.get("target_mpp"))
    if "read_size_level" in attrs:  # what preprocessing computed for this level
        read_size = int(attrs["read_size_level"])
    elif "patch_size_level0" in attrs:
        read_size = int(round(float(attrs["patch_size_level0"]) / downsample))
    elif mpp and target_mpp:
        read_size = int(round(patch_size * target_mpp / (mpp * downsample)))
    else:
        raise PatchFileError(
            f"patch file {path}: cannot tell the region size to read (needs patch_size_level0, or mpp and target_mpp)")
    if read_size < 1:
        raise PatchFileError(f"patch file {path}: region size to read is {read_size} px")
    if slide_path in (None, ""):
        slide_path = attrs.get("slide_path")
        if isinstance(slide_path, bytes):
            slide_path = slide_path.decode()
    if not slide_path:
        raise PatchFileError(f"patch file {path}: no slide path (neither in the datalist nor attribute slide_path)")
    return PatchInfo(path.stem, Path(slide_path), coords, level, read_size, patch_size, mpp, target_mpp)


def _float_or_none(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def feature_file_is_complete(path: Path, coords: np.ndarray, encoder: Encoder, slide_path=None) -> bool:
    """True when ``path`` holds features of every patch in ``coords`` from this very encoder and weights
    (and, when ``slide_path`` is given, from the slide file as it is now)."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as h5:
            feats, stored = h5["features"], h5["coords"][()]
            return (
                feats.shape == (len(coords), encoder.feature_dim)
                and np.array_equal(stored.reshape(-1, 2), coords)
                and h5.attrs.get("encoder") == encoder.name
                and h5.attrs.get("weights_sha256") == encoder.weights_sha256
                and (slide_path is None or h5.attrs.get("slide_fingerprint", "") == slide_fingerprint(slide_path))
            )
    except Exception:  # noqa: BLE001 - unreadable: extract again
        return False


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


class _SlideWriter:
    """An open temporary feature file, renamed into place by commit()."""

    def __init__(self, final: Path, info: PatchInfo, encoder: Encoder, reader_backend: str, rank: int = 0, world: int = 1):
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(final))
        self.h5 = h5py.File(tmp, "w")
        n = len(info.coords)
        self.features = self.h5.create_dataset(
            "features", shape=(n, encoder.feature_dim), dtype="float32",
            chunks=(max(1, min(n, 256)), encoder.feature_dim) if n else None)
        self.h5.create_dataset("coords", data=info.coords)
        attrs = {
            "encoder": encoder.name, "weights_sha256": encoder.weights_sha256,
            "patch_size": info.patch_size, "mpp": info.mpp if info.mpp else np.nan,
            "target_mpp": info.target_mpp if info.target_mpp else np.nan,
            "level": info.level, "read_size": info.read_size, "input_size": encoder.input_size,
            "slide_id": info.slide_id, "slide_path": str(info.slide_path), "reader": reader_backend,
            "slide_fingerprint": slide_fingerprint(info.slide_path),
            "rank": rank, "world_size": world,
        }
        for key, value in attrs.items():
            self.h5.attrs[key] = value
        self.written = 0
        self.n = n

    def write(self, feats: np.ndarray) -> None:
        end = self.written + len(feats)
        if end > self.n:
            raise RuntimeError(f"reader returned more patches than the {self.n} in the patch file")
        self.features[self.written:end] = feats
        self.written = end

    def commit(self) -> None:
        if self.written != self.n:
            raise RuntimeError(f"only {self.written} of {self.n} patches were read")
        self.h5.close()
        self._stack.close()  # rename into place

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.h5.close()
        with contextlib.suppress(Exception):
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)  # deletes the temporary file


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
                write_csv(OutputLayout(self.output_dir).extract_summary, all_rows, SUMMARY_COLUMNS)
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
        features_dir = OutputLayout(self.output_dir).features_dir
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
                info = read_patch_file(OutputLayout(self.output_dir).patch_file(record.slide_id), record.path)
                row["n_patches"] = len(info.coords)
                if not self.overwrite and feature_file_is_complete(final, info.coords, self.encoder, info.slide_path):
                    row["status"] = "skipped"
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
                        writer = _SlideWriter(features_dir / f"{info.slide_id}.h5", info, self.encoder, payload, rank, world)
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
