"""The pieces that stream a large checkpoint: reusable buffers, direct-I/O writes, memory-mapped tensor views."""

from __future__ import annotations

import errno
import fcntl
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lyco_core.buffers import BufferPool, size_class
from lyco_core.errors import CorruptFileError
from lyco_core.formats import direct_io
from lyco_core.formats.direct_io import SequentialWriter
from lyco_core.formats.safetensors_io import StreamWriter, TensorReader, atomic_output, read_header


def _direct_supported(folder: Path) -> bool:
    probe = folder / ".probe"
    w = SequentialWriter(probe)
    w.close()
    probe.unlink()
    return w.direct


# --------------------------------------------------------------------------------------------- BufferPool
def test_size_class_bounds() -> None:
    rng = random.Random(0)
    sizes = [1, 2, 3, 4, 5, 7, 8, 9, 4095, 4096, 4097, 1 << 20, (1 << 20) + 1]
    sizes += [rng.randrange(1, 1 << 31) for _ in range(500)]
    for n in sizes:
        c = size_class(n)
        assert n <= c <= max(4, n * 5 // 4 + 1), n
        assert size_class(c) == c, n  # a class holds itself
    assert sorted(size_class(n) for n in range(1, 5000)) == [size_class(n) for n in range(1, 5000)]


def test_pool_reuses_given_back_buffers() -> None:
    pool = BufferPool(min_bytes=1024, max_idle_bytes=1 << 30)
    a = pool.take(100_000)
    assert a.dtype == torch.uint8
    assert a.numel() == 100_000
    ptr = a.data_ptr()
    view = a.view(torch.float32)[10:20]  # any view of the buffer gives it back
    pool.give(view)
    assert pool.lent == 0
    b = pool.take(size_class(100_000) - 7)  # same class
    assert b.data_ptr() == ptr
    assert (pool.allocated, pool.reused) == (1, 1)
    c = pool.take(100_000)  # the only idle buffer is lent: a new one
    assert c.data_ptr() != ptr
    assert pool.allocated == 2
    pool.give(torch.empty(100_000, dtype=torch.uint8))  # not the pool's: ignored
    pool.give(b)
    pool.give(b)  # twice: the second is ignored, the buffer is idle once
    d, e = pool.take(100_000), pool.take(100_000)
    assert d.data_ptr() == ptr
    assert e.data_ptr() != ptr
    assert pool.allocated == 3


def test_pool_small_requests_and_idle_cap() -> None:
    pool = BufferPool(min_bytes=1024, max_idle_bytes=0)
    small = pool.take(100)
    assert small.numel() == 100
    assert pool.lent == 0
    big = pool.take(10_000)
    ptr = big.data_ptr()
    pool.give(big)
    again = pool.take(10_000)
    assert pool.reused == 0
    assert pool.allocated == 2
    del again, ptr


# --------------------------------------------------------------------------------------------- SequentialWriter
def _pieces(rng: random.Random, total: int) -> list[bytes]:
    out, n = [], 0
    while n < total:
        k = min(total - n, rng.choice([0, 1, 7, 4096, 5000, direct_io.CHUNK_BYTES - 3, 2 * direct_io.CHUNK_BYTES + 11]))
        out.append(rng.randbytes(k))
        n += k
    return out


@pytest.mark.parametrize("direct", [True, False])
def test_sequential_writer_writes_exact_bytes(tmp_path: Path, direct: bool) -> None:
    rng = random.Random(1)
    pieces = _pieces(rng, 3 * direct_io.CHUNK_BYTES + 12345)
    path = tmp_path / "out.bin"
    w = SequentialWriter(path, direct=direct)
    for p in pieces:
        w.write(p)
    w.close()
    assert path.read_bytes() == b"".join(pieces)
    assert w.size == path.stat().st_size
    if not direct:
        assert not w.direct


def test_sequential_writer_small_and_empty_files(tmp_path: Path) -> None:
    for data in (b"", b"x", bytes(range(256)) * 17):
        path = tmp_path / f"f{len(data)}"
        w = SequentialWriter(path)
        w.write(data)
        w.close()
        assert path.read_bytes() == data


def test_sequential_writer_falls_back_when_a_direct_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT, so the writer never writes directly here")
    real_write = os.write
    direct_calls: list[int] = []

    def picky_write(fd: int, data: memoryview) -> int:
        """The device refuses the second direct write (as one with a larger logical block size would)."""
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_calls.append(len(data))
            if len(direct_calls) == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", picky_write)
    data = random.Random(3).randbytes(3 * direct_io.CHUNK_BYTES + 777)
    path = tmp_path / "out.bin"
    w = SequentialWriter(path)
    assert w.direct
    w.write(data)
    w.close()
    assert len(direct_calls) == 2
    assert not w.direct
    assert path.read_bytes() == data


# --------------------------------------------------------------------------------------------- TensorReader.view
def _mixed_file(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    tensors = {
        "a_half_odd": torch.randn(3, 5, generator=g).half(),  # 30 bytes: the next tensor starts unaligned
        "b_float": torch.randn(7, 9, generator=g),
        "c_big": torch.randn(300, 1000, generator=g),
        "d_empty": torch.empty(0, 4),
        "e_bf16": torch.randn(64, generator=g).bfloat16(),
    }
    with atomic_output(path) as tmp:
        w = StreamWriter(tmp, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
        for k, v in tensors.items():
            w.write(k, v)
        w.finish()
    return tensors


def test_view_equals_get_and_the_written_tensors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = _mixed_file(path)
    header = read_header(path)
    assert (header.data_offset + header.tensors["b_float"].offsets[0]) % 4  # the case that cannot be mapped
    assert load_file(path).keys() == tensors.keys()
    with TensorReader(path) as r:
        for k, v in tensors.items():
            got = r.view(k)
            assert got.dtype == v.dtype
            assert got.shape == v.shape
            assert torch.equal(got, v), k
            assert torch.equal(got, r.get(k)), k
            pool = BufferPool(min_bytes=0)
            assert torch.equal(r.get(k, pool), v), k


def test_view_of_a_file_cut_short_after_opening(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    _mixed_file(path)
    with TensorReader(path) as r:
        os.truncate(path, path.stat().st_size - 1000)
        with pytest.raises(CorruptFileError, match=r"m\.safetensors.*'c_big'.*ends early"):
            r.view("c_big")


def test_view_reads_when_the_file_cannot_be_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    tensors = _mixed_file(path)
    from lyco_core.formats import safetensors_io

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(19, "No such device")  # ENODEV: what mmap says on a filesystem that cannot map

    monkeypatch.setattr(safetensors_io.mmap, "mmap", refuse)
    with TensorReader(path) as r:
        got = r.view("c_big")
    assert torch.equal(got, tensors["c_big"])
