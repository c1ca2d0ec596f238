"""Moved: the patch-coordinate file lives in :mod:`scripts.formats.patch_file` (the one home of the
format). This name stays so older imports keep working."""

from scripts.formats.patch_file import PatchFile, read_patch_file, slide_fingerprint, write_patch_file  # noqa: F401

__all__ = ["PatchFile", "read_patch_file", "slide_fingerprint", "write_patch_file"]
