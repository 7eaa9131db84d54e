"""Output detection: does a queued image already have its outputs, or can the journal supply them?

The scheduler asks both just before it decodes a queued image, since time passed since it was
queued (phicapctl or a person may have written its caption; the daemon may have stopped between
staging a caption and writing its files):

* ``staged_fingerprint``: the journal holds a caption staged for the image's current bytes
  (``writer``: a group with several files per image is staged first), so its files are written
  from there and the model is not asked;
* ``already_captioned``: every output the root writes is there and kept by the policy, so the
  image is done without a caption.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from phicapd.config import Settings, WatchRoot
from phicapd.outputs import metadata, safe_files
from phicapd.outputs.formats.jsonl import Manifest
from phicapd.outputs.freshness import changed_ns
from phicapd.outputs.naming import Claims, SiblingIndex, sidecar_may_exist
from phicapd.outputs.root import Known, RootOutputs, sidecar_base

if TYPE_CHECKING:  # only its fields are read: the journal stays a floor above
    from phicapd.pipeline.journal import Job

F = TypeVar("F")


def staged_fingerprint(
    job: Job, settings: Settings, root: WatchRoot, fingerprint_of: Callable[[Path], F | None]
) -> F | None:
    """The image's fingerprint when the job's staged caption can still be written for it: the
    image is as it was captioned, or it changed because that caption was embedded into it."""
    if not job.staged or job.caption is None or job.sha256 is None:
        return None
    now = fingerprint_of(job.path)
    if now is None:
        return None
    # The journal's fingerprint follows the file (a scan updates it), so the bytes decide; a
    # rare path (a crash mid-write), so reading the image once more costs nothing that matters.
    try:  # a regular file of the size the decoder takes, never a pipe swapped in since
        fd, _ = safe_files.open_regular(job.path, settings.imaging.max_file_bytes)
        with os.fdopen(fd, "rb") as fh:
            same = hashlib.file_digest(fh, "sha256").hexdigest() == job.sha256
    except OSError:
        return None
    if same:
        return now
    embedded = "embed" in settings.formats_for(root) or (job.formats is not None and "embed" in job.formats)
    if embedded and metadata.read_description(job.path) == job.caption:
        return now
    return None


def already_captioned(
    job: Job,
    settings: Settings,
    root: WatchRoot,
    claims_near: Callable[[Path], Mapping[str, str]],
    list_images: Callable[[Path, WatchRoot], list[str]],
) -> str | None:
    """The sidecar base of the job's image when every output its root writes is there now and
    kept by the policy (never when forced); None when the image needs its caption.

    ``claims_near``: the journal's claims in the image's directory; ``list_images``: the images
    of a directory that the root's naming rule sees."""
    outputs = RootOutputs.of(settings, root)
    if job.force or outputs.policy == "overwrite":
        return None
    extension = outputs.named_extension
    claims = Claims(claims_near(job.path), job.path.parent)
    named = extension is not None and (job.path.name in claims.by_image or sidecar_may_exist(job.path, extension))
    if extension is not None and not named:
        return None  # the usual case, known without listing the directory
    try:
        st = job.path.stat()
    except OSError:
        return None
    base = sidecar_base(job.path)
    if named:
        base = SiblingIndex(list_images(job.path.parent, root)).base_for(job.path.name, claims)
    # Queued, so what the journal last wrote is no longer enough: its caption is not current.
    known = Known(job.caption, False, None, job.sidecar, job.updated_at)
    manifest = partial(Manifest.read, job.path.parent)
    return None if outputs.missing(job.path, changed_ns(st), base, known, manifest) else base
