"""DICOM backend: single-file TILED_FULL whole-slide images, frames decoded on demand with pydicom
(OpenSlide 4 rejects some of these files: "Couldn't get image flavor")."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image  # JPEG / JPEG 2000: PIL follows the codestream's own colour space
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array

from scripts.wsi.backends.base import SlideHandle, SlideReadError, _hwc, to_rgb


class DicomHandle(SlideHandle):
    """A single-file DICOM whole-slide image (TILED_FULL frames, one resolution), frames decoded on demand."""

    backend = "dicom"
    parallel_reads = False  # frames are decoded into a shared cache

    def __init__(self, path):
        super().__init__(path)

        self.ds = pydicom.dcmread(str(self.path))
        if "TotalPixelMatrixColumns" not in self.ds:
            raise SlideReadError(f"{self.path}: DICOM file without TotalPixelMatrixColumns is not a tiled whole-slide image")
        organisation = self.ds.get("DimensionOrganizationType", "TILED_FULL") or "TILED_FULL"
        if organisation != "TILED_FULL" or self.ds.get("PerFrameFunctionalGroupsSequence"):
            raise SlideReadError(f"{self.path}: DICOM {organisation} frame layout with per-frame positions is not supported")
        self.width, self.height = int(self.ds.TotalPixelMatrixColumns), int(self.ds.TotalPixelMatrixRows)
        self.tile_w, self.tile_h = int(self.ds.Columns), int(self.ds.Rows)
        self.tiles_across = -(-self.width // self.tile_w)
        self.n_frames = int(self.ds.get("NumberOfFrames", 1))
        if self.n_frames < self.tiles_across * -(-self.height // self.tile_h):
            raise SlideReadError(f"{self.path}: DICOM holds {self.n_frames} frames, fewer than its pixel matrix needs")
        self.level_dimensions = [(self.width, self.height)]
        self.level_downsamples = [1.0]
        self._frames: dict[int, np.ndarray] = {}
        self._encapsulated = self.ds.file_meta.TransferSyntaxUID.is_compressed
        if self._encapsulated:
            self._frame_bytes = list(generate_frames(self.ds.PixelData, number_of_frames=self.n_frames))

    def _frame(self, index: int) -> np.ndarray:
        frame = self._frames.get(index)
        if frame is None:
            if self._encapsulated and self.ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.90"):
                frame = np.asarray(Image.open(io.BytesIO(self._frame_bytes[index])).convert("RGB"))
            else:
                frame = _hwc(pixel_array(self.ds, index=index))
            if len(self._frames) > 256:
                self._frames.clear()
            self._frames[index] = frame
        return frame

    def _read(self, location, size, level):
        width, height = size
        lx, ly = location
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + width, self.width), min(ly + height, self.height)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                tile = to_rgb(self._frame(ty * self.tiles_across + tx))
                gx0, gy0 = tx * self.tile_w, ty * self.tile_h
                sx0, sy0 = max(x0, gx0), max(y0, gy0)
                sx1, sy1 = min(x1, gx0 + self.tile_w), min(y1, gy0 + self.tile_h)
                out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = tile[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0]
        return out
