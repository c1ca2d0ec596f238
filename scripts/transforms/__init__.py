"""The per-slide steps of slide -> patch grid -> encoder input, as MONAI dictionary transforms.

Each is a ``monai.transforms.MapTransform`` working on one slide's dictionary; the configs chain them in a
``monai.transforms.Compose``, so a step is replaced by pointing its ``_target_`` at another class::

    OpenSlided      "image" (path) -> "wsi" (an open SlideHandle via SlideWSIReader) and "mpp" (trusted)
    TissueMaskd     "wsi" -> "thumbnail", "mask_downsample", "tissue_mask", "tissue_info"
    PatchGridd      "wsi" + "tissue_mask" -> "grid" (level choice, read size, coords at the target um/px)
    ReadPatchesd    "image" + "coords" -> "patches": an iterator of (B, H, W, 3) uint8 batches
    EncoderInputd   "patches" (a batch) -> float tensor resized and normalised for the encoder

A user's tissue step only has to set ``tissue_mask`` (boolean, H x W), ``mask_downsample`` (level-0 pixels
per mask pixel), ``thumbnail`` and ``tissue_info`` (at least ``tissue_area_mm2``).
"""

from scripts.transforms.slide import EncoderInputd, OpenSlided, PatchGridd, ReadPatchesd, TissueMaskd

__all__ = ["OpenSlided", "TissueMaskd", "PatchGridd", "ReadPatchesd", "EncoderInputd"]
