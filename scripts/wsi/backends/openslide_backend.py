"""OpenSlide backend (through MONAI's ``WSIReader(backend="openslide")``); keeps the OpenSlide properties,
which :mod:`scripts.wsi.mpp` reads the resolution from."""

from __future__ import annotations

from scripts.wsi.backends.monai_wsi import MonaiWSIHandle


class OpenSlideHandle(MonaiWSIHandle):
    backend = "openslide"

    def __init__(self, path):
        super().__init__(path, "openslide")
