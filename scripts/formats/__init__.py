"""One home per file format and per output path.

- ``patch_file``: patch-coordinate h5 files (bundle, CLAM and TRIDENT layouts), read and written.
- ``feature_file``: feature files (bundle h5, CLAM ``h5_files``/``pt_files``, TRIDENT ``features_<enc>``).
- ``layout``: :class:`OutputLayout`, every path of an output folder.
- ``checkpoints``: fold checkpoints and published models, saved and loaded safely.
- ``fingerprint``: content fingerprints of slide and feature files (held-out and duplicate checks).
- ``annotations``: QuPath GeoJSON annotations (lesion outlines), read and written.
- ``attention_outputs``: per-patch attention h5, heat-map and top-k PNGs, QuPath GeoJSON tiles and tier outlines.

Nothing outside this package opens these files.
"""
