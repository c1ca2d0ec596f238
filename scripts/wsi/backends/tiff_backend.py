"""tifffile backend: any TIFF pyramid, any codec imagecodecs has, decoding only the tiles a region touches."""

from __future__ import annotations

import math
import threading

import numpy as np
import tifffile

from scripts.wsi.backends.base import SlideHandle, SlideReadError, _hwc


class TiffFileHandle(SlideHandle):
    """Any TIFF pyramid via tifffile, decoding only the tiles a region touches."""

    backend = "tifffile"

    def __init__(self, path):
        super().__init__(path)

        self.tif = tifffile.TiffFile(str(self.path))
        series = self.tif.series[0]
        self.pages = []
        for level in series.levels:
            page = level.keyframe if hasattr(level, "keyframe") else level.pages[0]
            self.pages.append(page)
        base_h, base_w = self.pages[0].imagelength, self.pages[0].imagewidth
        for page in self.pages:
            self.level_dimensions.append((int(page.imagewidth), int(page.imagelength)))
            self.level_downsamples.append(float(base_w) / page.imagewidth if page.imagewidth else 1.0)
        self._whole: dict[int, np.ndarray] = {}
        self._file_lock = threading.Lock()  # seek + read of one tile at a time; decoding runs in parallel
        del base_h

    def _read(self, location, size, level):
        page = self.pages[level]
        width, height = size
        ds = self.level_downsamples[level]
        lx, ly = int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds))
        lw, lh = self.level_dimensions[level]
        out = np.full((height, width, page.samplesperpixel if page.samplesperpixel in (1, 3, 4) else 3), 255, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + width, lw), min(ly + height, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        if not page.is_tiled:
            whole = self._whole.get(level)
            if whole is None:
                if page.imagewidth * page.imagelength > 2**28:
                    raise SlideReadError(f"{self.path}: striped (untiled) TIFF level of {page.imagewidth}x{page.imagelength} px is too large to read whole")
                whole = self._whole[level] = _hwc(page.asarray())
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = whole[y0:y1, x0:x1, : out.shape[-1]]
            return out
        tw, th = page.tilewidth, page.tilelength
        tiles_across = -(-lw // tw)
        fh = self.tif.filehandle
        decode = page.decode
        jpegtables = page.jpegtables
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = ty * tiles_across + tx
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                if not count:
                    continue
                with self._file_lock:
                    fh.seek(offset)
                    data = fh.read(count)
                tile, _, _ = decode(data, index, jpegtables=jpegtables)
                tile = _hwc(np.asarray(tile).reshape(tile.shape[-3:]) if tile.ndim > 3 else tile)
                # the tile's place in the level and its overlap with the request
                gx0, gy0 = tx * tw, ty * th
                sx0, sy0 = max(x0, gx0), max(y0, gy0)
                sx1, sy1 = min(x1, gx0 + tw, lw), min(y1, gy0 + th, lh)
                out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = tile[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0, : out.shape[-1]]
        return out

    def close(self):
        self.tif.close()
