"""Opening a file that someone else controls: a target's mapped images, a pidfile, the config.

Whoever controls the path can put a FIFO there (a plain open() for reading waits for a writer
forever), a device (/dev/zero never ends; opening some devices has side effects), a directory,
or a symlink to any of them. So the path is first opened with O_PATH, which opens nothing but
the name; fstat on that fd says what it is, and only a regular file is then opened for reading,
through /proc/self/fd (the same inode, so nothing can be swapped in between). Reads are bounded
by the caller's ceiling: one pread, never "read to the end".
"""
from __future__ import annotations

import os
import stat

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink"))


class NotRegularFile(OSError):
    """The path names something other than a regular file; `kind` says what ("a FIFO")."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path}: not a regular file ({kind})")
        self.strerror = f"not a regular file ({kind})"   # what callers print after the path
        self.filename = path
        self.kind = kind


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str, follow_symlinks: bool = False) -> int:
    """A read-only fd on the regular file at `path`; never blocks, never opens anything else.

    `follow_symlinks=False` (O_NOFOLLOW) where the path is ours to resolve; True for the
    kernel's magic links (/proc/PID/exe, /proc/PID/map_files/...) and for paths an operator
    may point through a symlink (a config file mounted from a ConfigMap). Raises
    NotRegularFile, or OSError as open() does.
    """
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    handle = os.open(path, flags)
    try:
        st = os.fstat(handle)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, _kind(st.st_mode))
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(handle)
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            raise NotRegularFile(path, _kind(opened.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_head(path: str, limit: int, follow_symlinks: bool = False) -> bytes:
    """Up to `limit` bytes from the start of the regular file at `path` (one pread).

    A longer file is cut at `limit`; callers that must refuse one ask for `limit + 1`.
    """
    fd = open_regular(path, follow_symlinks)
    try:
        return os.pread(fd, limit, 0)
    finally:
        os.close(fd)
