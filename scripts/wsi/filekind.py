"""What kind of file a slide is, from its first bytes: the one fact both the readers and ``mpp`` need.

Kept apart so that ``scripts.wsi.mpp`` and the reader modules both import it and never each other.
"""

from __future__ import annotations

from pathlib import Path


def file_kind(path: str | Path) -> str:
    """'tiff', 'dicom' or 'other', from the first bytes of the file (no reader is involved)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return "other"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[128:132] == b"DICM":
        return "dicom"
    return "other"
