"""Freshness: whether an existing output is kept as it is under the root's ``existing`` policy.

``skip`` keeps a non-empty output at least as new as its image (its content is never judged: it
may have been edited by hand), ``only-missing`` keeps any output that exists, ``overwrite`` none
(the scans also ask the journal whether this daemon wrote it: ``outputs.root``).
"""

from __future__ import annotations

import os
from pathlib import Path


def is_up_to_date(image_stat: os.stat_result, sidecar: Path) -> bool:
    """``skip`` policy: a non-empty sidecar at least as new as its image is kept as it is.

    The sidecar may have been edited by hand, so its content is never judged; an image whose
    bytes changed gets a newer mtime than its sidecar and is captioned again.
    """
    return _newer(changed_ns(image_stat), sidecar)


def changed_ns(image_stat: os.stat_result) -> int:
    """When the image last changed, as ``skip`` compares it with its sidecar's mtime: its mtime,
    unless that is later than its ctime.

    An mtime later than the ctime was set, not earned: ``cp -p``, unzip or a camera with a fast
    clock stamped the file in the future, and a sidecar written after the copy would look older
    than the image for days, captioned again by every scan. The ctime, which nothing can set,
    says when the copy happened. Writing the image raises both, so it is still captioned again.
    """
    return min(image_stat.st_mtime_ns, image_stat.st_ctime_ns)


def _newer(image_mtime_ns: int, sidecar: Path) -> bool:
    try:
        st = sidecar.stat()
    except OSError:
        return False
    return st.st_size > 0 and st.st_mtime_ns >= image_mtime_ns


def policy_keeps(policy: str, image_mtime_ns: int, sidecar: Path) -> bool:
    """Whether the ``existing`` policy keeps ``sidecar`` as it is: ``skip`` while it is up to
    date (``is_up_to_date``; pass ``changed_ns`` of the image's stat where there is one),
    ``only-missing`` whenever it exists, ``overwrite`` never (the reconciler also asks the journal
    whether this daemon wrote it, for ``overwrite``)."""
    if policy == "skip":
        return _newer(image_mtime_ns, sidecar)
    if policy == "only-missing":
        return sidecar.exists()
    return False
