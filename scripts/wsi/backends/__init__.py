"""One module per slide-reading backend, each a :class:`~scripts.wsi.backends.base.SlideHandle` subclass.

``cucim_backend`` (MONAI's cuCIM reader), ``openslide_backend`` (MONAI's OpenSlide reader), ``tiff_backend``
(tifffile, tile by tile) and ``dicom_backend`` (pydicom, TILED_FULL frames). :func:`handle_class` maps a
backend name to its class, importing only that backend's module.
"""

from __future__ import annotations

import importlib

DEFAULT_BACKENDS = ("cucim", "openslide", "tifffile", "dicom")
_MODULES = {
    "cucim": ("scripts.wsi.backends.cucim_backend", "CuCIMHandle"),
    "openslide": ("scripts.wsi.backends.openslide_backend", "OpenSlideHandle"),
    "tifffile": ("scripts.wsi.backends.tiff_backend", "TiffFileHandle"),
    "dicom": ("scripts.wsi.backends.dicom_backend", "DicomHandle"),
}


def handle_class(backend: str):
    """The ``SlideHandle`` subclass of ``backend`` (one of ``DEFAULT_BACKENDS``)."""
    if backend not in _MODULES:
        raise ValueError(f"unknown backend {backend!r}; choose from {DEFAULT_BACKENDS}")
    module, name = _MODULES[backend]
    return getattr(importlib.import_module(module), name)
