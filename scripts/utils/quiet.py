"""Keep the console readable on machines without a GPU.

cuCIM, nvImageCodec and CUDA-enabled torch builds print long warnings when no GPU is present. The
environment variables below are read by those libraries at import time, so this runs when ``scripts``
is first imported. Python warnings that say nothing actionable on a CPU machine are filtered to one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings

_QUIET_ENV = {
    # nvImageCodec / cuCIM GPU decode probes
    "NVIMGCODEC_LOG_LEVEL": "0",
    "NVIMGCODEC_SEVERITY": "0",
    "CUCIM_LOG_LEVEL": "ERROR",
    # TensorFlow-style C++ logging used by some plugins
    "TF_CPP_MIN_LOG_LEVEL": "3",
    # do not try to reach the hub from timm / huggingface
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # cuFile (GPUDirect Storage, loaded by cuCIM) writes cufile.log into the working directory
    "CUFILE_LOGFILE_PATH": os.path.join(tempfile.gettempdir(), f"cufile-{os.getuid()}.log"),
    "CUFILE_LOGGING_LEVEL": "FATAL",
}

_IGNORED_WARNINGS = (
    r".*CUDA initialization.*",
    r".*cuda.*not available.*",
    r".*Can't initialize NVML.*",
    r".*pkg_resources is deprecated.*",
    r".*TypedStorage is deprecated.*",
    r".*Importing from timm\.models\.layers is deprecated.*",
    r".*torch\.cuda\.amp.*deprecated.*",
)

_done = False


def quiet_native_libraries() -> None:
    """Set quiet defaults once; a user's own environment variables win."""
    global _done
    if _done:
        return
    _done = True
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


@contextlib.contextmanager
def native_output_silenced(note: str | None = None):
    """Silence what native libraries write straight to file descriptors 1 and 2 inside the block.

    On machines without a GPU driver cuCIM prints lines about libcuda / cuFile (GPUDirect Storage) on
    fd 1 the first time it opens a file, and its bundled libtiff prints codec notes on fd 2. Those come
    from C++ and bypass Python's ``sys.stdout`` / ``sys.stderr``, so the descriptors themselves are
    pointed at /dev/null for the block. ``note`` is logged once instead.
    """
    saved = []
    try:
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            stream.flush()
            saved.append((fd, os.dup(fd)))
    except (OSError, ValueError, AttributeError):  # no real descriptors (e.g. captured by a test runner)
        for _, copy in saved:
            os.close(copy)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd, _ in saved:
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)
    if note and note not in _noted:
        _noted.add(note)
        logging.getLogger("scripts").info(note)


native_stderr_silenced = native_output_silenced  # older name, kept for callers
_noted: set[str] = set()
