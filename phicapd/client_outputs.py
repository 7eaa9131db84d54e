"""The outputs phicapctl writes itself, with its own user's permissions, kept as the daemon's own.

phicapctl asks how the watcher would name and keep an image's files (``sidecar_policy``), writes
them, and reports the caption written (``record``): the journal records it as the writer records
its own, so the scans do not caption the image again and ``phicapctl stale`` judges it like the
daemon's. The daemon writes nothing for the client but the root's manifest, which is its own
(the writer thread's) to keep. Paths are configuration keys and journal keys; the daemon opens
none of phicapctl's files but to stat the image and to check that an output holds the caption.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phicapd.config import Settings, WatchRoot
from phicapd.errors import BAD_REQUEST, CAPTION_NOT_WRITTEN, IMAGE_GONE, NOT_WATCHED, PhicapError
from phicapd.log import get_logger
from phicapd.outputs.naming import Claims, is_rule_base
from phicapd.outputs.root import RootOutputs, sidecar_base
from phicapd.pipeline.decode import fingerprint_of
from phicapd.pipeline.journal import Journal, Success
from phicapd.pipeline.paths import is_watched_dir, journal_path, owning_root

log = get_logger(__name__)

#: ``merge(directory, {image name: caption})``: the writer takes captions into a manifest.
MergeManifest = Callable[[Path, dict[str, str]], None]


class ClientOutputs:
    def __init__(self, store: Journal, merge_manifest: MergeManifest) -> None:
        self.store = store
        self._merge_manifest = merge_manifest

    def sidecar_policy(self, settings: Settings, path: Path) -> dict[str, Any]:
        """What phicapctl needs to name and keep the sidecar of ``path`` exactly as the watcher
        would (``ControlBackend.sidecar_policy``): the owning root's include/ignore patterns feed
        the naming rule (``list_images``) and its ``existing`` setting overrides the global one."""
        policy: dict[str, Any] = {
            "extension": settings.sidecar.extension,
            "existing": settings.sidecar.existing,
            "root": None,
            "claims": {},
            "formats": list(settings.sidecar.formats),
            "xmp_naming": settings.sidecar.xmp_naming,
        }
        root = owning_root(path, settings.watch)
        if root is None:
            return policy
        policy["existing"] = settings.existing_policy(root)
        policy["formats"] = list(settings.formats_for(root))
        policy["xmp_naming"] = settings.xmp_naming_for(root)
        policy["claims"] = self.store.claims_in(journal_path(path, root).parent)
        # The client's directory is resolved; a symlinked root matches it by its resolved form,
        # and list_images relates the directory to the root, so report the form that matched.
        base = root.path
        if not is_watched_dir(path.parent, root):
            base = Path(os.path.realpath(root.path))
        policy["root"] = {
            "path": str(base),
            "recursive": root.recursive,
            "include": list(root.include),
            "ignore": list(root.ignore),
        }
        return policy

    def claim_sidecar(self, settings: Settings, image: Path, root: WatchRoot, sidecar: str) -> None:
        """phicapctl writes ``sidecar`` for ``image``: keep that name the image's, as the writer
        does for its own."""
        extension = RootOutputs.of(settings, root).named_extension
        if extension is None or not sidecar.endswith(extension):
            log.warning("sidecar name not recorded", path=str(image), sidecar=sidecar)
            return
        base = self._claim(image, sidecar[: -len(extension)])
        if base is not None:
            self.store.claim_sidecars([(image, base)])

    def _claim(self, image: Path, base: str) -> str | None:
        """``base``, the sidecar base phicapctl named ``image``'s files with, if it is to be claimed
        for the image; None if the image holds a claim already, the name is not one the rule can
        give the image, or it already belongs to another image that is still there (then
        phicapctl named it without a claim that appeared meanwhile; the journal's claim stands)."""
        if not is_rule_base(image.name, base):
            log.warning("sidecar name not recorded", path=str(image), base=base)
            return None
        claims = Claims(self.store.claims_near(image), image.parent)
        if image.name in claims.by_image or claims.holder(base, ()) not in (None, image.name):
            return None
        return base

    def record(
        self,
        settings: Settings,
        path: Path,
        *,
        sidecar: str | None,
        caption: str,
        sha256: str,
        model: str,
        backend: str | None,
        prompt: str,
        settings_key: str,
    ) -> bool:
        """``ControlBackend.captioned``: phicapctl wrote ``caption`` for the image at ``path``."""
        root = owning_root(path, settings.watch)
        if root is None:
            raise PhicapError(f"{path} is under no watch root", code=NOT_WATCHED)
        image = journal_path(path, root)
        # Stat here, not the client's word: after an embed the image is a new file (inode), and
        # the journal must know that version as captioned, or ``overwrite`` would redo it.
        fingerprint = fingerprint_of(image)
        if fingerprint is None:
            raise PhicapError(f"{path}: no such image to record", code=IMAGE_GONE)
        outputs = RootOutputs.of(settings, root)
        extension = outputs.named_extension
        base, claim = sidecar_base(image), None
        if extension is not None:  # per-image files, named by the rule (and phicapctl's claims)
            if sidecar is None or not sidecar.endswith(extension) or len(sidecar) == len(extension):
                raise PhicapError(f"sidecar must name the image's {extension} file, got {sidecar!r}", code=BAD_REQUEST)
            base = sidecar[: -len(extension)]
            claim = self._claim(image, base)
        # The caption goes into the root's manifest, which the daemon writes: only one that an
        # output of the image already holds (whoever reports it could write there, or the daemon
        # did) is taken, not any text a client of the socket sends. A root that writes only the
        # manifest has no such output: there the socket's group is trusted, as for captions.
        if outputs.formats != ("jsonl",) and not outputs.holds(image, base, caption):
            raise PhicapError(f"{path}: none of its outputs holds the reported caption", code=CAPTION_NOT_WRITTEN)
        record = Success(
            0,
            sha256,
            model,
            prompt,
            str(outputs.primary(image, base)),
            fingerprint,
            backend=backend,
            caption=caption,
            settings_key=settings_key,
            formats=outputs.formats,
        )
        recorded = self.store.record_captioned(image, root.path, record, claim)
        if recorded and "jsonl" in outputs.formats:
            self._merge_manifest(image.parent, {image.name: caption})
        return recorded


def no_manifest_writer(directory: Path, captions: dict[str, str]) -> None:
    """While the model loads there is no writer yet to keep the manifests: a caption phicapctl
    reports then is recorded in the journal, and its directory's manifest does not take it in."""
