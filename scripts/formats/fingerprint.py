"""Content fingerprints of slide and feature files: the one definition every held-out and duplicate check uses.

A fingerprint names a file's *bytes*, not its name: a slide copied to another path, or listed under a
new slide and patient id, has the fingerprint of the original. Fold checkpoints record the fingerprints
of their training and validation slides (``scripts.workflows.training.data_provenance``); evaluation refuses a
cohort whose files match them (``scripts.data.heldout``), and a datalist that lists the same content twice
is refused (``scripts.data.datalist``, ``scripts.data.bags``).

What is hashed (:data:`FINGERPRINT_METHOD`): sha256 over the file size (8 bytes, little-endian), then
the first 1 MiB, the last 1 MiB and :data:`N_BLOCKS` blocks of 64 KiB evenly spaced in between. A file
no larger than those parts together (2.5 MiB) is hashed whole. So a fingerprint reads at most 2.5 MiB
whatever the file's size: a 3 GB slide costs about as much as a 3 MB one (a few milliseconds on a local
disk). Results are cached per process by (path, size, modification time, inode).

Caveats of sampling, both ways:

* two *different* files of the same size whose sampled bytes agree collide (e.g. a copy edited only in
  the unsampled middle). Whole-slide files are compressed tile by tile and carry a header and tile
  offset tables at their ends, so two different scans agreeing on every sampled block is not expected,
  but it is possible; such a false match refuses a slide that was in fact held out (``--allow_overlap
  true`` scores it, stamped in-sample).
* only byte-identical copies match. The same glass slide scanned again, converted to another format,
  re-compressed, or its features extracted again (an HDF5 file with other bytes) gets another
  fingerprint; for features the slide fingerprint still catches a re-extraction of the same slide file.

A path that is not a regular file (missing, a DICOM folder) has no fingerprint (None); the checks then
rely on slide ids and patient ids alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

HEAD_BYTES = 1 << 20
TAIL_BYTES = 1 << 20
BLOCK_BYTES = 64 << 10
N_BLOCKS = 8
FINGERPRINT_METHOD = "sha256(size + first 1 MiB + last 1 MiB + 8 evenly spaced 64 KiB blocks; whole file up to 2.5 MiB) v1"

_CACHE: dict[tuple, str] = {}


def file_fingerprint(path: str | os.PathLike | None) -> str | None:
    """The content fingerprint of ``path`` (hex sha256, see the module docstring), or None when ``path`` is
    None or not a regular file. An unreadable file raises ``OSError`` naming it."""
    if path is None or str(path) == "":
        return None
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256(int(stat.st_size).to_bytes(8, "little"))
    with open(path, "rb") as handle:
        for offset, length in _sampled_ranges(stat.st_size):
            handle.seek(offset)
            digest.update(handle.read(length))
    value = digest.hexdigest()
    _CACHE[key] = value
    return value


def _sampled_ranges(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the parts hashed for a file of ``size`` bytes."""
    if size <= HEAD_BYTES + TAIL_BYTES + N_BLOCKS * BLOCK_BYTES:
        return [(0, size)]
    middle_start, middle_end = HEAD_BYTES, size - TAIL_BYTES
    step = (middle_end - middle_start - BLOCK_BYTES) / max(N_BLOCKS - 1, 1)
    blocks = [(middle_start + int(round(i * step)), BLOCK_BYTES) for i in range(N_BLOCKS)]
    return [(0, HEAD_BYTES), *blocks, (middle_end, TAIL_BYTES)]


def duplicate_contents(entries: Iterable[tuple[str, str | os.PathLike | None]]) -> list[list[tuple[str, Path]]]:
    """Groups of two or more ``(name, path)`` entries whose files have the same content fingerprint
    (the same path listed twice included), in first-seen order. Only files whose size occurs more than
    once are read, so a cohort without duplicates costs one ``stat`` per file."""
    by_size: dict[int, list[tuple[int, str, Path]]] = {}
    for index, (name, path) in enumerate(entries):
        if path is None or str(path) == "":
            continue
        path = Path(path)
        try:
            if not path.is_file():
                continue
            size = path.stat().st_size
        except OSError:
            continue
        by_size.setdefault(size, []).append((index, name, path))
    groups: dict[str, list[tuple[int, str, Path]]] = {}
    for candidates in by_size.values():
        if len(candidates) < 2:
            continue
        for item in candidates:
            groups.setdefault(file_fingerprint(item[2]), []).append(item)
    found = sorted((group for group in groups.values() if len(group) > 1), key=lambda group: group[0][0])
    return [[(name, path) for _, name, path in group] for group in found]


def describe_duplicates(group: Sequence[tuple[str, Path]], what: str) -> str:
    """One line naming every entry of a duplicate group (``what``: "slide file", "feature file")."""
    names = " and ".join(name for name, _ in group) if len(group) == 2 else ", ".join(name for name, _ in group)
    paths = {str(p) for _, p in group}
    if len(paths) == 1:
        where = f"the same {what} {next(iter(paths))}"
    else:
        where = f"{what}s with the same content ({', '.join(str(p) for _, p in group)})"
    return f"{names} point at {where}; keep one row per slide"


__all__ = ["FINGERPRINT_METHOD", "file_fingerprint", "duplicate_contents", "describe_duplicates"]
