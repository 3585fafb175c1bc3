"""Writing a large file front to back without going through the page cache (``O_DIRECT``), where that is possible.

A multi-GB output written the usual way is copied by the kernel into freshly allocated page-cache pages and then
written out again by the ``fsync`` an atomic write needs. On the 2-core VMs Lyco is built on, that copy into new
cache pages was the largest single cost of a bake (seconds for the SD 1.5 UNet, and most of the run-to-run noise).
With ``O_DIRECT`` the bytes go from one reused, page-aligned staging buffer straight to the device; the final
``fsync`` only commits metadata. Where the filesystem or platform refuses ``O_DIRECT`` (tmpfs, macOS, some network
filesystems), or refuses a write with it, the writer falls back to ordinary buffered writes: same bytes either way.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

#: Bytes per device write; a multiple of every block size O_DIRECT may require.
CHUNK_BYTES = 8 << 20
#: Alignment of the padded final write (the file is truncated to its true size afterwards).
_ALIGN = 4096


class SequentialWriter:
    """Writes ``path`` (created or truncated) from its first byte to its last; :meth:`close` when done.

    With direct I/O, data is staged in two page-aligned buffers of :data:`CHUNK_BYTES`: while one is written to
    the device on a background thread, the caller fills the other. ``direct=False`` (or no ``O_DIRECT`` on this
    platform) writes through the page cache instead. :attr:`direct` says which way the bytes went; :attr:`size`
    is the number of bytes written so far.
    """

    def __init__(self, path: str | Path, *, direct: bool = True) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        o_direct = getattr(os, "O_DIRECT", 0)
        self.direct = False
        fd = -1
        if direct and o_direct:
            try:
                fd = os.open(path, flags | o_direct, 0o666)
                self.direct = True
            except OSError:  # EINVAL on filesystems without direct I/O
                fd = -1
        if fd < 0:
            fd = os.open(path, flags, 0o666)
        self._fd = fd
        self.size = 0
        self._fill = 0
        self._chunk = CHUNK_BYTES
        self._staged = self.direct
        # numpy views: their slice assignment releases the GIL during the copy, unlike a memoryview's
        n_views = 2 if self.direct else 0
        self._views = [np.frombuffer(mmap.mmap(-1, self._chunk), dtype=np.uint8) for _ in range(n_views)]
        self._cur = 0
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lyco-direct-io") if self.direct else None
        self._pending: Future[None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (any contiguous buffer)."""
        mv = memoryview(data).cast("B")
        self.size += len(mv)
        if not self._staged:
            self._write_all(mv)
            return
        src = np.frombuffer(mv, dtype=np.uint8)
        pos = 0
        while pos < len(mv):
            n = min(self._chunk - self._fill, len(mv) - pos)
            self._views[self._cur][self._fill : self._fill + n] = src[pos : pos + n]
            self._fill += n
            pos += n
            if self._fill == self._chunk:
                self._flush()

    def close(self) -> None:
        """Write what is staged and close the file (its size is exactly the bytes written)."""
        if self._fd < 0:
            return
        try:
            if self._staged and self._fill:
                self._flush()
            self._wait()
            os.ftruncate(self._fd, self.size)  # a direct write pads the last chunk to the alignment
        finally:
            self._release()

    def abort(self) -> None:
        """Close without writing what is staged (the caller removes the file)."""
        with contextlib.suppress(OSError):
            self._wait()
        self._release()

    def _flush(self) -> None:
        """Hand the current staging buffer to the I/O thread (padded to the alignment) and switch buffers."""
        assert self._io is not None
        view = self._views[self._cur]
        padded = -(-self._fill // _ALIGN) * _ALIGN
        view[self._fill : padded] = 0
        self._wait()  # the other buffer's write must be done before the caller refills it
        self._pending = self._io.submit(self._write_all, view[:padded].data)
        self._cur ^= 1
        self._fill = 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_all(self, mv: memoryview) -> None:
        """Write all of ``mv``; when a direct write is refused, switch the file to buffered writes and retry."""
        pos = 0
        while pos < len(mv):
            try:
                pos += os.write(self._fd, mv[pos:])
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):  # an alignment or size the device refuses
                    raise
                import fcntl  # POSIX only, like O_DIRECT: imported where direct I/O is in use

                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False  # staging goes on; padding past the end is cut by close()

    def _release(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._views = []

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)


__all__ = ["CHUNK_BYTES", "SequentialWriter"]
