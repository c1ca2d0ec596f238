"""Stand-in for ``pydicom_seg`` so that MONAI Label 0.8.5 can start beside pydicom 3.

MONAI Label 0.8.5 imports pydicom-seg at start-up (``monailabel/datastore/utils/convert.py``), only to
convert DICOM SEG label files. pydicom-seg 0.4.1 does not import under pydicom 3 (it needs
``pydicom._storage_sopclass_uids``, removed in pydicom 3), which this bundle's DICOM slide backend needs;
MONAI Label's later code replaced pydicom-seg with highdicom. This SMILE app serves whole-slide images and
never converts DICOM SEG, so this package only lets the import succeed: using anything from it raises.
Installed by ``make serve-install`` (apps/monailabel/requirements.txt); ``pip uninstall
smile-pydicom-seg-stub`` removes it.
"""

STUB = True
__version__ = "0.0.1+smile-stub"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(
        f"pydicom_seg.{name}: DICOM SEG conversion is not available in this environment (a stand-in for "
        "pydicom-seg is installed so that MONAI Label 0.8.5 starts beside pydicom 3; see "
        "apps/monailabel/stubs/pydicom_seg)")
