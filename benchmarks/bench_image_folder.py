"""Listing an ImageFolder: ``connectome.extract.data.image_samples`` (each file once, links
followed once by real path) against torchvision's ``ImageFolder``, timed in the same run on
the same folder of empty ``.jpg`` files (listing reads no image).

    python benchmarks/bench_image_folder.py [--classes 20] [--folders 5] [--files 200] [--repeat 3]

Prints both times (best of ``--repeat``) and ``ratio`` = torchvision time / ours (> 1: ours
is faster), and checks that both list the same files in the same order.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--folders", type=int, default=5, help="sub-folders per class")
    p.add_argument("--files", type=int, default=200, help="files per sub-folder")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()

    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import find_classes

    from connectome.extract.data import image_samples

    with tempfile.TemporaryDirectory() as root:
        for c in range(a.classes):
            for s in range(a.folders):
                d = os.path.join(root, f"c{c}", f"s{s}")
                os.makedirs(d)
                for i in range(a.files):
                    open(os.path.join(d, f"{i}.jpg"), "wb").close()
        theirs = ours = float("inf")
        for _ in range(a.repeat):
            t = time.perf_counter()
            expected = ImageFolder(root).samples
            theirs = min(theirs, time.perf_counter() - t)
            t = time.perf_counter()
            got = image_samples(root, find_classes(root)[1])
            ours = min(ours, time.perf_counter() - t)
        assert got == expected, "image_samples differs from torchvision's ImageFolder on a folder without links"
        print(f"{len(got):,} files: torchvision ImageFolder {theirs:.3f} s, image_samples {ours:.3f} s, "
              f"ratio {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
