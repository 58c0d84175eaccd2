"""Fault injection for subprocess tests: imported at start-up when this folder is on
PYTHONPATH. ``OPTICAM_TEST_ENOSPC_AFTER=N`` makes every ``os.fsync`` after the first N
fail with ENOSPC, as a local disk that has just filled up does (opticam fsyncs each file
it writes before renaming it into place)."""

import errno
import os

_after = os.environ.get("OPTICAM_TEST_ENOSPC_AFTER")
if _after is not None:
    _real_fsync = os.fsync
    _calls = [0]

    def _fsync(fd: int) -> None:
        _calls[0] += 1
        if _calls[0] > int(_after):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _real_fsync(fd)

    os.fsync = _fsync
