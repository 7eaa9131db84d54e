"""What running exiv2 in a worker process costs: ``read_description`` in-process vs through the
worker, best and median of ``--repeat`` calls, on a JPEG with a caption and on an XMP sidecar.

    python bench/exiv2_worker.py [--repeat 200] [--threads 1]

``--threads N`` also times N threads reading at once through the one worker (they queue on its
lock), against the same N threads in-process.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from phicapd.pipeline import exiv2_worker, metadata

ROOT = Path(__file__).resolve().parents[1]
JPEG = ROOT.parent / "shared" / "testdata" / "images" / "hubble_deep_field.jpg"
XMP = ROOT / "tests" / "data" / "xmp" / "darktable.jpg.xmp"


def _times(read: Callable[[Path], object], path: Path, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        read(path)
        out.append((time.perf_counter() - started) * 1000)
    return out


def _wall(read: Callable[[Path], object], path: Path, repeat: int, threads: int) -> float:
    """Milliseconds per read with ``threads`` threads reading ``repeat`` times each."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: [read(path) for _ in range(repeat)], range(threads)))
    return (time.perf_counter() - started) * 1000 / (repeat * threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        jpeg = Path(tmp) / "photo.jpg"
        shutil.copyfile(JPEG, jpeg)
        metadata.embed_caption(jpeg, "A field of distant galaxies.")
        xmp = Path(tmp) / "photo.jpg.xmp"
        shutil.copyfile(XMP, xmp)
        metadata.write_xmp_sidecar(xmp, "A field of distant galaxies.")
        started = time.perf_counter()
        metadata._supervisor.close()
        metadata.read_description(jpeg)  # a fresh worker's start
        print(f"worker start + first read: {(time.perf_counter() - started) * 1000:.1f} ms")
        for name, path in (("jpeg", jpeg), ("xmp", xmp)):
            for how, read in (("in-process", exiv2_worker.read_in_process), ("worker", metadata.read_description)):
                assert read(path) == "A field of distant galaxies."
                ms = _times(read, path, args.repeat)
                print(f"{name:4} {how:10}: best {min(ms):.3f} ms, median {statistics.median(ms):.3f} ms")
            if args.threads > 1:
                for how, read in (("in-process", exiv2_worker.read_in_process), ("worker", metadata.read_description)):
                    per = _wall(read, path, args.repeat, args.threads)
                    print(f"{name:4} {how:10}: {args.threads} threads, {per:.3f} ms per read (wall)")


if __name__ == "__main__":
    main()
