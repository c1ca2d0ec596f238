"""Whole-slide-image building blocks shared by preprocessing, feature extraction and inference.

- ``mpp``: physical resolution (microns per pixel) from vendor metadata, with its source.
- ``filekind``: TIFF / DICOM / other from a file's first bytes (shared by ``mpp`` and the readers).
- ``probe``: the crash-safe cuCIM probe (a child process, ``_cucim_probe.py``, opens each file first).
- ``backends/``: one module per backend (cuCIM, OpenSlide, tifffile, DICOM), each a ``SlideHandle``.
- ``open``: ``open_slide`` - the fallback chain cuCIM -> OpenSlide -> tifffile -> DICOM, plus the trusted mpp.
- ``patches``: ``PatchReader`` / ``iter_patch_batches`` (patch grids for feature extraction, cuCIM batched
  reads) and ``warm_up``.
- ``reader``: ``SlideWSIReader``, the MONAI ``BaseWSIReader`` component over all of the above.
- ``tissue``: low-resolution tissue mask (saturation Otsu + ITK morphology and hole filling).
- ``grid``: pyramid level choice and the tissue patch grid.
- ``edges``: patches that run past a level's edge (detected, painted white); shared by the CPU and GPU readers.
- ``gpu_decode``: cuCIM reads into CUDA memory (nvJPEG) for extraction on GPUs.
- ``preview``: the tissue/grid preview PNG.

The patch-coordinate file lives in :mod:`scripts.formats.patch_file`.
"""
