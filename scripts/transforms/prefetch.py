"""Read-ahead across slides: run each slide's transforms (open + batched patch reading) on a background
thread while the encoder works on the batches already read.

A slide's *items* are ``("start", backend)`` once the slide is open, then ``("batch", patches)`` per uint8
batch (B, H, W, 3); the slide's error, if any, is raised from the iterator. :func:`slide_items` gives them
for one slide, read when asked (no thread); :class:`SlidePrefetcher` gives the same items for a list of
slides, read ``depth`` batches ahead, across slide boundaries.

The transforms are the ``extract_transforms`` Compose of configs/extract.json (``OpenSlided`` then
``ReadPatchesd`` by default): any chain that leaves ``data["patches"]`` (an iterator of ``(patches, coords)``)
and, optionally, ``data["wsi"]`` (closed after the slide) and ``data["backend"]`` will do.

Why not MONAI's ``ThreadDataLoader`` / ``ThreadBuffer``: they buffer the items of one iterable; here one
slide's transform result is itself a lazy iterator of batches, and the read-ahead has to flow from one
slide's last batch into the next slide's opening, in order, with each slide's failure kept to that slide.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

from scripts.utils.errors import find_bundle_error


def unwrap_transform_error(error: BaseException) -> BaseException:
    """The slide's own error under MONAI's "applying transform ..." wrapping (a bundle error when there is
    one in the chain, else the innermost wrapped cause)."""
    found = find_bundle_error(error)
    if found is not None:
        return found
    while isinstance(error, RuntimeError) and str(error).startswith("applying transform") and error.__cause__:
        error = error.__cause__
    return error


def slide_items(transforms: Callable[[dict], dict], data: dict) -> Iterator[tuple[str, Any]]:
    """``("start", backend)`` then ``("batch", patches)`` for each batch of ``transforms(data)["patches"]``;
    the opened slide (``"wsi"``) is closed when the items end, fail or are abandoned."""
    try:
        result = transforms(data)
    except Exception as error:  # noqa: BLE001 - re-raised as the slide's own error
        raise unwrap_transform_error(error) from error
    try:
        yield "start", str(result.get("backend", ""))
        for batch in result["patches"]:
            yield "batch", batch[0] if isinstance(batch, tuple) else batch
    finally:
        handle = result.get("wsi")
        if hasattr(handle, "close"):
            handle.close()


class SlidePrefetcher:
    """Items of ``inputs[i]`` (slide dictionaries) through ``transforms``, read ahead on one thread.

    Use as a context manager; call :meth:`items` for the slides in order (0, 1, ...). A slide whose items
    are abandoned half-way (e.g. the encoder failed) has its remaining batches skipped. At most ``depth``
    batches wait in memory.
    """

    def __init__(self, inputs: Sequence[dict], transforms: Callable[[dict], dict], depth: int = 4) -> None:
        self.inputs, self.transforms = list(inputs), transforms
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True, name="slide-prefetch")
        self._pending: tuple | None = None

    def __enter__(self) -> "SlidePrefetcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):  # unblock the producer
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=10)

    def items(self, index: int) -> Iterator[tuple[str, Any]]:
        """Slide ``index``'s items (as :func:`slide_items`), taken from the read-ahead queue."""
        while True:
            if self._pending is None:
                self._pending = self._queue.get()
            position, kind, payload = self._pending
            if position < index:  # leftovers of a slide abandoned half-way
                self._pending = None
                continue
            if position > index:
                raise RuntimeError(f"slide {index} was already passed by the read-ahead")
            self._pending = None
            if kind == "error":
                raise payload
            if kind == "end":
                return
            yield kind, payload

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        for index, data in enumerate(self.inputs):
            if self._stop.is_set():
                return
            items = slide_items(self.transforms, data)
            try:
                for kind, payload in items:
                    if not self._put((index, kind, payload)):
                        return
                end = (index, "end", None)
            except Exception as error:  # noqa: BLE001 - handed to the consumer, reported for this slide only
                end = (index, "error", error)
            finally:
                items.close()
            if not self._put(end):
                return
        self._put((len(self.inputs), "end", None))
