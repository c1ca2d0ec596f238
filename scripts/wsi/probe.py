"""Crash-safe cuCIM probe: ask a child process (``_cucim_probe.py``) whether cuCIM can open each file.

cuCIM 26.10 segfaults on some TIFFs (e.g. deflate with a predictor); a segfault cannot be caught in
Python, so the verdict comes from a child process and is cached per file (path, size, mtime) for this
process. Used by :mod:`scripts.wsi.open` before cuCIM is ever called in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from scripts.wsi.filekind import file_kind

_PROBE_SCRIPT = Path(__file__).with_name("_cucim_probe.py")
_PROBE_CACHE: dict[tuple, tuple[bool, str]] = {}


def _cache_key(path) -> tuple:
    path = Path(path).resolve()
    try:
        stat = path.stat()
        return (str(path), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return (str(path), -1, -1)


def probe_cucim(paths: Sequence[str | os.PathLike], timeout_per_file: float = 30.0) -> dict[str, tuple[bool, str]]:
    """Ask a child process whether cuCIM can open and decode each file; cached per file for this process.

    Returns ``{str(path): (ok, message)}``. One child process handles many files; when cuCIM kills it
    (segfault), that file is marked and a fresh child carries on with the rest.
    """
    result: dict[str, tuple[bool, str]] = {}
    todo: list[str] = []
    for path in paths:
        key = _cache_key(path)
        if key in _PROBE_CACHE:
            result[str(path)] = _PROBE_CACHE[key]
        elif not Path(path).is_file():
            result[str(path)] = (False, "file does not exist")
        elif file_kind(path) == "dicom":
            result[str(path)] = (False, "DICOM files are not read with cuCIM here")
        else:
            todo.append(str(path))
    while todo:
        verdicts = _run_probe(todo, timeout_per_file)
        for index, path in enumerate(todo[: len(verdicts)]):
            result[path] = _PROBE_CACHE[_cache_key(path)] = verdicts[index]
        todo = todo[len(verdicts):]
    return result


def _run_probe(paths: list[str], timeout_per_file: float) -> list[tuple[bool, str]]:
    """Probe ``paths`` in order until the child dies; returns verdicts for a non-empty prefix."""
    cmd = [sys.executable, str(_PROBE_SCRIPT), *paths]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10.0 + timeout_per_file * len(paths))
        stdout, returncode, timed_out = proc.stdout, proc.returncode, False
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        returncode, timed_out = None, True
    verdicts: dict[int, tuple[bool, str]] = {}
    started = -1
    for line in stdout.splitlines():
        parts = line.split("\t", 2)
        if parts[0] == "START":
            started = int(parts[1])
        elif parts[0] == "OK":
            verdicts[int(parts[1])] = (True, f"cuCIM ok ({parts[2]} channels)")
        elif parts[0] == "ERR":
            verdicts[int(parts[1])] = (False, f"cuCIM cannot read it: {parts[2]}")
    done = 0
    while done in verdicts:
        done += 1
    if done < len(paths):
        if timed_out:
            why = "cuCIM timed out opening it"
        elif returncode is not None and returncode < 0:
            why = f"cuCIM crashed the probe process (signal {-returncode})"
        else:
            why = f"cuCIM probe process exited with code {returncode}"
        verdicts[done] = (False, why)
        done += 1
    return [verdicts[i] for i in range(done)]
