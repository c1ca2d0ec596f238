"""Whole-slide-image building blocks shared by preprocessing, feature extraction and inference.

- ``mpp``: physical resolution (microns per pixel) from vendor metadata, with its source.
- ``reader``: open a slide with backend fallback (cuCIM -> OpenSlide -> tifffile -> pydicom) behind a
  crash-safe probe; ``SlideHandle.read_region``; ``PatchReader`` / ``iter_patch_batches`` (patch grids for
  feature extraction, cuCIM batched reads) and ``warm_up``.
- ``tissue``: low-resolution tissue mask (saturation Otsu + ITK morphology and hole filling).
- ``grid``: pyramid level choice and the tissue patch grid.
- ``patch_file``: the per-slide patch coordinate file (writer, and a reader that also takes CLAM/TRIDENT files).
"""
