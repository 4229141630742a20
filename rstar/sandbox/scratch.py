"""Per-run scratch directories and their disk cap, as the fork server sees them.

Responsibility: create one run's private scratch directory, say whether the run
has reached its disk cap (`disk_bytes` in all, `disk_files` entries), and remove
it afterwards. Two modes, chosen once per fork server by `enter_private_mounts`:

- `tmpfs` (the fork server may mount: root, or a user namespace): the directory
  is its own tmpfs, `size=disk_bytes,nr_inodes=disk_files+1`, mounted in the fork
  server's private mount namespace (invisible to the service and the host, gone
  with the fork server). The kernel enforces the cap: a write past it fails with
  ENOSPC at once; the memory is freed when the run's tmpfs is unmounted.
- `scan` (no mounts: an unprivileged pod): a plain directory under `scratch_root`;
  the fork server walks it while the run runs (adding the files the worker holds
  open after deleting them) and ends the run once it holds more than the cap.
  The overshoot is what the program writes between two scans (`POLL_SECONDS`),
  so the pod's `emptyDir` needs room for it (k8s/base/sandbox.yaml).

What it does not do: decide what happens to a run over its cap (the fork server
kills it and classifies the end), or cap a single file (RLIMIT_FSIZE, set by the
worker on itself, does).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile

POLL_SECONDS = 0.1   # how often the fork server looks at the scratch use of running workers

_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
_MNT_DETACH = 2
_CLONE_NEWNS = 0x00020000

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    ret = _libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                      ctypes.c_ulong(flags), data.encode() if data else None)
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or ''} on {target}: {os.strerror(err)}")


def enter_private_mounts() -> str | None:
    """Move the fork server into its own mount namespace, so per-run tmpfs mounts stay private.

    Returns None on success, else why not (then scratch directories are scanned).
    Must run after the user namespace is entered (non-root), before any fork.
    """
    if _libc.unshare(_CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        return f"unshare(CLONE_NEWNS): {os.strerror(err)} (errno {err})"
    try:
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing we mount propagates to the host
    except OSError as e:
        return str(e)
    return None


def _deleted_open_bytes(pid: int) -> int:
    """Bytes of regular files the process holds open after unlinking them: invisible to a directory walk."""
    total = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if st.st_nlink == 0 and (st.st_mode & 0o170000) == 0o100000:
            total += st.st_blocks * 512
    return total


def _own_again(directory: str) -> None:
    """Give a directory back its owner's rwx: a program's chmod 000 must hide nothing from a scan or rmtree.

    Through an O_PATH|O_NOFOLLOW fd (its /proc/self/fd link), so a directory swapped for a
    symlink cannot redirect the chmod. Only a non-root fork server needs it (root reads anyway).
    """
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if os.fstat(fd).st_mode & 0o700 != 0o700:
            os.chmod(f"/proc/self/fd/{fd}", 0o700)
    except OSError:
        pass
    finally:
        os.close(fd)


class Scratch:
    """Creates, measures and removes the scratch directories of one fork server."""

    def __init__(self, base: str, disk_bytes: int, disk_files: int, tmpfs: bool):
        self.base, self.disk_bytes, self.disk_files = base, disk_bytes, disk_files
        self.mode = "tmpfs" if tmpfs else "scan"

    def create(self) -> str:
        path = tempfile.mkdtemp(prefix="run-", dir=self.base)
        if self.mode == "tmpfs":
            try:
                # +1: the tmpfs root directory is an inode of its own
                _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV,
                       f"size={self.disk_bytes},nr_inodes={self.disk_files + 1},mode=700")
            except OSError:
                os.rmdir(path)
                raise
        return path

    def exceeded(self, path: str, pid: int = 0) -> bool:
        """Whether the run has reached its cap (tmpfs: it is full; scan: it holds more than the cap).

        `pid`: the running worker, whose open but deleted files a scan counts too.
        """
        if self.mode == "tmpfs":
            try:
                st = os.statvfs(path)
            except OSError:
                return False
            return st.f_bavail == 0 or st.f_favail == 0
        return self._scan_exceeded(path, _deleted_open_bytes(pid) if pid else 0)

    def _scan_exceeded(self, path: str, used: int) -> bool:
        files = 0
        stack = [path]
        while stack:
            d = stack.pop()
            try:
                _own_again(d)
                with os.scandir(d) as it:
                    for entry in it:
                        files += 1
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        used += st.st_blocks * 512
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        if used > self.disk_bytes or files > self.disk_files:
                            return True  # stop early: the walk of a huge tree costs the loop time
            except OSError:
                continue
        return used > self.disk_bytes  # the open deleted files alone may be over it

    def remove(self, path: str) -> None:
        if self.mode == "tmpfs":
            _libc.umount2(path.encode(), _MNT_DETACH)  # frees the run's memory at once

        def retry_writable(func, p, _exc):
            _own_again(os.path.dirname(p))
            try:
                func(p)
            except OSError:
                pass

        shutil.rmtree(path, onerror=retry_writable)

    def describe(self) -> str:
        return f"{self.disk_bytes} bytes, {self.disk_files} files"
