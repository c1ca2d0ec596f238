"""Small helpers every layer may use; nothing here imports another package of the bundle.

- ``errors``: :class:`BundleError` (one short message naming the file and the fix) and the excepthook.
- ``quiet``: quiet defaults for chatty native libraries (cuCIM, ITK, OpenSlide).
- ``io_utils``: atomic writes (temporary name, then rename), CSV and JSON.
- ``distributed``: torchrun helpers (process group, rank, DDP wrapping of packed-bag networks).
"""
