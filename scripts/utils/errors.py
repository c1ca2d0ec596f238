"""Errors a person can read: one short paragraph naming the file and the fix, no traceback.

Every error the bundle raises for bad *input* (datalist, weights file, slide, feature file, checkpoint,
settings) derives from :class:`BundleError`. Those errors stay ordinary exceptions inside the code, so a
per-slide loop can still catch one slide's failure and go on. Only when one reaches the top of the
process uncaught does :func:`install_excepthook` print its message alone and exit with status 1.

MONAI wraps exceptions raised while it evaluates a config expression or instantiates a component
("Failed to evaluate ConfigExpression ..."); the hook walks the ``__cause__`` / ``__context__`` chain to
find the bundle's own error underneath, so the wrapping costs the user nothing.

The full traceback is kept when asked for: ``--debug true`` on the command line (a harmless config
override for ``python -m monai.bundle run``) or ``SMILE_DEBUG=1`` in the environment.
"""

from __future__ import annotations

import os
import sys


class BundleError(Exception):
    """Base class of every user-facing error: its message says what is wrong, where, and the fix."""


class AllSlidesFailedError(BundleError):
    """Every slide of a run failed: the stage wrote its summary, then the process exits non-zero."""


def raise_if_all_failed(rows: list[dict], stage: str, summary, failed_statuses=("failed",)) -> None:
    """Raise :class:`AllSlidesFailedError` when ``rows`` is non-empty and every row's ``status`` is failed;
    the message gives the count, the first slide's reason and where the summary is."""
    if not rows or any(str(row.get("status", "")) not in failed_statuses for row in rows):
        return
    first = rows[0]
    reason = " ".join(str(first.get("error") or first.get("warning") or "no reason recorded").split())[:400]
    raise AllSlidesFailedError(
        f"{stage}: every slide failed ({len(rows)} of {len(rows)}); first, {first.get('slide_id')!r}: {reason} "
        f"(each slide's reason is in {summary})")


def debug_requested(argv: list[str] | None = None) -> bool:
    """True when the user asked for full tracebacks (``--debug [true]`` or ``SMILE_DEBUG=1``)."""
    if os.environ.get("SMILE_DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
        return True
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--debug":
            value = argv[i + 1].lower() if i + 1 < len(argv) else "true"
            return value not in ("false", "0", "no")
        if arg.startswith("--debug="):
            return arg.split("=", 1)[1].lower() not in ("false", "0", "no")
    return False


def find_bundle_error(exc: BaseException | None) -> BundleError | None:
    """The first :class:`BundleError` in ``exc``'s cause/context chain (``exc`` itself included)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BundleError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def format_error(error: BundleError) -> str:
    """The text printed for ``error``: its message, plus how to see the traceback."""
    message = str(error).strip() or type(error).__name__
    return f"error: {message}\n(run with --debug true or SMILE_DEBUG=1 for the full traceback)"


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    error = find_bundle_error(exc)
    if error is None or debug_requested():
        _previous(exc_type, exc, tb)
        return
    sys.stderr.write(format_error(error) + "\n")
    sys.stderr.flush()


def install_excepthook() -> None:
    """Print uncaught :class:`BundleError` s as one paragraph (idempotent; called on ``import scripts``)."""
    if getattr(sys.excepthook, "__name__", "") != "_excepthook":
        sys.excepthook = _excepthook


__all__ = ["AllSlidesFailedError", "BundleError", "raise_if_all_failed", "debug_requested", "find_bundle_error", "format_error", "install_excepthook"]
