"""Which watch roots need polling: mount detection from ``/proc/self/mountinfo``.

Rules:

* A root's ``poll`` setting wins when set.
* Otherwise a root is polled exactly when it lies on a network or shared filesystem (NFS, SMB,
  sshfs, 9p, virtiofs, ...), where inotify cannot see changes made by other clients or by the
  host of a VM; everywhere else inotify is used.
* The mount holding a path is the deepest mount point above its real path (symlinks
  resolved); of two mounts on the same point, the later one hides the earlier.
* Unknown (no ``/proc``, unreadable) means "not remote".
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from phicapd.config import WatchRoot

# Filesystems whose changes made elsewhere (another client, the host of a VM) never reach local
# inotify. FUSE mounts appear as "fuse.<helper>".
REMOTE_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "afs",
        "ocfs2",
        "gfs2",
        "beegfs",
        "virtiofs",
        "vboxsf",
        "davfs",
        "fuse.sshfs",
        "sshfs",
        "fuse.glusterfs",
        "fuse.cephfs",
        "fuse.ceph-fuse",
        "fuse.s3fs",
        "fuse.rclone",
        "fuse.gcsfuse",
        "fuse.davfs2",
        "fuse.vmhgfs-fuse",
        "fuse.juicefs",
        "fuse.moosefs",
        "fuse.mfs",
        "fuse.beegfs",
    }
)


def _unescape_mount_field(value: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), value)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """``(mount point, fstype)`` for each line of ``/proc/self/mountinfo``, in file order."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        mounts.append((_unescape_mount_field(fields[4]), tail[0]))
    return mounts


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The fstype of the mount holding ``path`` (symlinks resolved), or None if unknown."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for mount_point, fstype in parse_mountinfo(mountinfo):
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        # ">=": a later mount on the same point hides the earlier one.
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), fstype)
    return best[1] if best else None


def is_remote_filesystem(fstype: str | None) -> bool:
    return fstype is not None and fstype.lower() in REMOTE_FILESYSTEMS


def needs_polling(root: WatchRoot, mountinfo: str | None = None) -> bool:
    """``root.poll`` when set; otherwise poll exactly where inotify cannot see remote changes."""
    if root.poll is not None:
        return root.poll
    return is_remote_filesystem(filesystem_type(root.path, mountinfo))
