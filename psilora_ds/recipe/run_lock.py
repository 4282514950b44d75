"""One run per ``output_dir`` at a time, and a fresh run never mixes with another run's checkpoints.

Rank 0 holds an exclusive ``flock`` on ``output_dir/.psilora_ds.lock`` for the life of its process: the kernel
releases it when the process ends in any way (``kill -9`` included), so a lock left by a dead run is stale by
construction and is simply taken over; a live one (on this host, or on another through a file system that
supports locks, such as NFS with lockd) refuses the second run with one line naming the holder. The file's text
(host, pid, start time) is only for that message. On a file system that has no locks (some FUSE or parallel file
systems mounted without them) the run goes on unguarded, with a warning that says so.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
import time

from .checkpoint import checkpoint_dirs
from .config import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = ".psilora_ds.lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)  # flock: not on this FS


class RunLock:
    """The lock of one ``output_dir`` (held from :meth:`acquire` until the process exits)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock (True), or warn and go on unguarded where the file system has no locks (False); a live
        holder is a :class:`ConfigError`."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in NO_LOCKS:
                os.close(fd)
                logger.warning("output_dir=%s: its file system does not support file locks (%s): this run goes on, "
                               "but a second run started into the same output_dir would not be refused and could "
                               "overwrite its checkpoints", os.path.dirname(self.path), os.strerror(err.errno))
                return False
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise ConfigError(f"output_dir={os.path.dirname(self.path)}: its lock file could not be locked "
                                  f"({err.strerror}): check that file system, or choose another output_dir") from None
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"output_dir={os.path.dirname(self.path)} is in use by a running job ({holder}): wait "
                              "for it, stop it, or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        self._fd = fd  # kept open: closing it would release the lock
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_fresh_start(checkpoint_root: str, overwrite: bool) -> None:
    """A run that does not resume, into a directory holding checkpoints (another run's, or an earlier start of this
    one): refused unless ``overwrite``, which removes them (renamed away first, then deleted)."""
    found = checkpoint_dirs(checkpoint_root)
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"{checkpoint_root} holds the checkpoints of an earlier run (newest: step-{found[-1][0]}): "
                          "pass --resume_from_checkpoint latest to continue it, or --overwrite_output_dir true to "
                          "start over and delete them")
    doomed = checkpoint_root.rstrip("/") + ".deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(checkpoint_root, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    logger.warning("overwrite_output_dir: deleted %d checkpoints of the earlier run in %s", len(found), checkpoint_root)
