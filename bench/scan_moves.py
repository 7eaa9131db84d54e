"""What the rename/copy check costs a reconcile scan: ``Reconciler.scan`` of N new images, with an
empty journal (a new image of a size no caption has costs nothing more) and with N captions of
other images of the same byte sizes (the worst case: each new image is read and its sha256 looked
up). Best of three runs each. Run it against another checkout with ``PYTHONPATH=that/checkout``.

    python bench/scan_moves.py [N]
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from phicapd.config import Settings, load_settings
from phicapd.pipeline.journal import Fingerprint, Journal, Success
from phicapd.pipeline.reconciler import Reconciler
from tests.support.fakes import write_unique_png


def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    root, other = tmp / "root", tmp / "other"
    root.mkdir()
    other.mkdir()
    for i in range(n):
        write_unique_png(root / f"img{i:05d}.png", i)
        write_unique_png(other / f"img{i:05d}.png", 100_000 + i)
    past = time.time() - 3600  # settled: none is deferred as maybe still being written
    for p in root.iterdir():
        os.utime(p, (past, past))

    def settings(state: str) -> Settings:
        config = tmp / f"{state}.toml"
        config.write_text(f'[state]\ndir = "{tmp / state}"\n[[watch]]\npath = "{root}"\n')
        return load_settings(config)

    def run(state: str, populate: bool) -> float:
        s = settings(state)
        store = Journal(s.state.dir / "journal.sqlite3")
        if populate:  # captions of images that are gone, of the same sizes as the new ones
            for p in sorted(other.iterdir()):
                st = p.stat()
                fp = Fingerprint(st.st_size, st.st_mtime_ns, st.st_ino)
                sha = hashlib.sha256(p.read_bytes()).hexdigest()
                success = Success(0, sha, "m", "p", str(p), fp, caption="c", settings_key="k")
                store.record_captioned(tmp / "gone" / p.name, root, success)
        started = time.perf_counter()
        report = Reconciler(s, store).scan(s.watch[0], reason="startup")
        elapsed = time.perf_counter() - started
        store.close()
        assert report.queued == n
        return elapsed

    for label, populate in (("empty journal", False), (f"{n} same-size captions of other images", True)):
        best = min(run(f"{label[:5]}{k}", populate) for k in range(3))
        print(f"{label}: scan of {n} new images {best:.3f} s ({best / n * 1e6:.0f} us per image)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
