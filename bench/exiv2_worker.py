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

from phicapd.outputs import exiv2_worker, metadata

ROOT = Path(__file__).resolve().parents[1]
JPEG = ROOT / "tests" / "data" / "images" / "hubble_deep_field.jpg"
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
        start_ms = (time.perf_counter() - started) * 1000
        rows: list[tuple[str, float, float]] = []  # (what, in-process ms, worker ms)
        readers = (exiv2_worker.read_in_process, metadata.read_description)
        for name, path in (("jpeg", jpeg), ("xmp", xmp)):
            for read in readers:
                assert read(path) == "A field of distant galaxies."
            best = [min(_times(read, path, args.repeat)) for read in readers]
            median = [statistics.median(_times(read, path, args.repeat)) for read in readers]
            rows += [(f"{name} read, best", best[0], best[1]), (f"{name} read, median", median[0], median[1])]
            if args.threads > 1:
                wall = [_wall(read, path, args.repeat, args.threads) for read in readers]
                rows.append((f"{name} read, {args.threads} threads (wall)", wall[0], wall[1]))
    print(f"\nexiv2 read_description, ms per call ({args.repeat} calls; worker start + first read {start_ms:.0f} ms)")
    print(f"{'':34} {'in-process':>10} {'worker':>8} {'worker vs in-process':>21}")
    for what, inproc, worker in rows:
        print(f"{what:34} {inproc:10.3f} {worker:8.3f} {worker / inproc:20.2f}x")


if __name__ == "__main__":
    main()
