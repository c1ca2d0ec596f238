"""cuCIM backend (through MONAI's ``WSIReader(backend="cucim")``).

Open only files the crash-safe probe (:mod:`scripts.wsi.probe`) accepted. ``raw`` is the ``CuImage``,
whose batched ``read_region`` :class:`scripts.wsi.patches.PatchReader` uses for patch grids.
"""

from __future__ import annotations

from scripts.wsi.backends.monai_wsi import MonaiWSIHandle


class CuCIMHandle(MonaiWSIHandle):
    backend = "cucim"

    def __init__(self, path):
        super().__init__(path, "cucim")
