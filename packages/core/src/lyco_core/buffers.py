"""Reusable byte buffers for streaming the tensors of a large checkpoint through memory.

Streaming a model one tensor at a time keeps the peak low, but a fresh allocation per tensor is not free: large
allocations come straight from the kernel, so every 4 KiB page of every tensor costs a page fault and a zeroing
(on a 2-core VM, baking the SD 1.5 UNet took ~330,000 such faults and seconds of system time). A
:class:`BufferPool` hands out views of buffers that earlier tensors gave back, so a stream touches each page once.
"""

from __future__ import annotations

import threading

import torch

#: Size classes per doubling: a buffer is at most 1/4 larger than the tensor it holds.
_CLASSES_PER_DOUBLING = 4


def size_class(nbytes: int) -> int:
    """The buffer size, in bytes, that holds ``nbytes``: ``nbytes`` rounded up to a quarter of its power of two."""
    if nbytes <= _CLASSES_PER_DOUBLING:
        return max(nbytes, 1)
    step = (1 << (nbytes.bit_length() - 1)) // _CLASSES_PER_DOUBLING
    return -(-nbytes // step) * step


class BufferPool:
    """Byte buffers lent out with :meth:`take` and given back with :meth:`give`; thread-safe.

    Requests smaller than ``min_bytes`` get a plain allocation (the allocator already recycles small blocks).
    At most ``max_idle_bytes`` of given-back buffers are kept for reuse; the rest are freed. Buffers never
    given back are freed with the pool.
    """

    def __init__(self, *, min_bytes: int = 1 << 16, max_idle_bytes: int = 512 << 20) -> None:
        self.min_bytes = min_bytes
        self.max_idle_bytes = max_idle_bytes
        self._lock = threading.Lock()
        self._idle: dict[int, list[torch.Tensor]] = {}
        self._idle_bytes = 0
        self._lent: dict[int, torch.Tensor] = {}  # data pointer → the whole buffer
        self.allocated = 0  # buffers created (for tests and tuning)
        self.reused = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A 1-D ``uint8`` tensor of ``nbytes`` (contents undefined), to be given back with :meth:`give`."""
        if nbytes < self.min_bytes:
            return torch.empty(nbytes, dtype=torch.uint8)
        size = size_class(nbytes)
        with self._lock:
            stack = self._idle.get(size)
            buf = stack.pop() if stack else None
            if buf is not None:
                self._idle_bytes -= size
                self.reused += 1
        fresh = buf is None
        if buf is None:  # allocated outside the lock: the other threads need not wait for its pages
            buf = torch.empty(size, dtype=torch.uint8)
        with self._lock:
            self.allocated += int(fresh)
            self._lent[buf.data_ptr()] = buf
        return buf[:nbytes]

    def give(self, tensor: torch.Tensor) -> None:
        """Return the buffer under ``tensor`` (any view of a taken buffer); other tensors are ignored.

        The caller promises that nothing reads or writes that memory afterwards.
        """
        ptr = tensor.untyped_storage().data_ptr()
        with self._lock:
            buf = self._lent.pop(ptr, None)
            if buf is None:
                return
            size = buf.numel()
            if self._idle_bytes + size <= self.max_idle_bytes:
                self._idle.setdefault(size, []).append(buf)
                self._idle_bytes += size

    @property
    def lent(self) -> int:
        """How many buffers are out."""
        with self._lock:
            return len(self._lent)


__all__ = ["BufferPool", "size_class"]
