"""SMILE whole-slide-image MIL bundle: the bundle's Python code.

The bundle root (the folder holding ``configs/`` and ``scripts/``) must be on ``sys.path``, as MONAI
bundles expect; ``python -m monai.bundle run`` from the bundle root does that.
"""

from scripts.quiet import quiet_native_libraries

quiet_native_libraries()

from scripts.errors import install_excepthook

install_excepthook()
