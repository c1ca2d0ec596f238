"""Run as a child process: can cuCIM open (and decode a pixel of) each file named on the command line?

cuCIM crashes the whole process on some files (a segfault cannot be caught in Python), so the parent
runs this script and reads one line per file from its stdout: ``START\t<i>`` before touching file i,
then ``OK\t<i>\t<channels>`` or ``ERR\t<i>\t<message>``. A START with no answer means the process died
on that file. Kept free of project imports so it starts in well under a second.
"""

import os
import sys


def main(paths: list[str]) -> None:
    # cuCIM prints libcuda / cuFile notes on fd 1 and libtiff notes on fd 2: answers go to a copy of fd 1
    answers = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import numpy as np
    from cucim import CuImage

    for index, path in enumerate(paths):
        print(f"START\t{index}", file=answers, flush=True)
        try:
            image = CuImage(path)
            levels = image.resolutions["level_count"]
            channels = 0
            for level in sorted({0, levels - 1}):
                width, height = image.resolutions["level_dimensions"][level]
                pixels = np.asarray(image.read_region((0, 0), (min(8, width), min(8, height)), level))
                channels = pixels.shape[-1] if pixels.ndim == 3 else 1
            print(f"OK\t{index}\t{channels}", file=answers, flush=True)
        except Exception as error:  # noqa: BLE001 - any failure is a verdict for this file
            message = " ".join(str(error).split())[:300] or type(error).__name__
            print(f"ERR\t{index}\t{message}", file=answers, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
