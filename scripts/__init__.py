"""SMILE whole-slide-image MIL bundle: the bundle's Python code.

The bundle root (the folder holding ``configs/`` and ``scripts/``) must be on ``sys.path``, as MONAI
bundles expect; ``python -m monai.bundle run`` from the bundle root does that.
"""

import os

from scripts.utils.quiet import quiet_native_libraries

# experiment tracking (--tracking mlflow) writes a local store only: no usage telemetry leaves the machine
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

quiet_native_libraries()

from scripts.utils.errors import install_excepthook

install_excepthook()
