"""Safetensors reading/writing: validation of corrupt files, atomic writes, and the payload hash."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from lyco_core.errors import CorruptFileError, FileExistsLycoError, InvalidConfigError, NotFoundError
from lyco_core.formats import safetensors_io as sio
from lyco_core.formats.safetensors_io import (
    LazyTensors,
    atomic_output,
    atomic_write_bytes,
    load_tensors,
    payload_sha256,
    payload_sha256_of,
    read_header,
    save_tensors,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(4, 16, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(16, 4, generator=g).to(torch.bfloat16),
        "lora_unet_a.alpha": torch.tensor(2.0),
        "lora_te_b.hada_w1_a": torch.randn(8, 2, generator=g).half(),
        "lora_te_b.conv.weight": torch.randn(4, 3, 3, 3, generator=g)[:, :, ::2],  # non-contiguous view
        "counts": torch.arange(5, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


def write_raw(path: Path, header: object, data: bytes, *, raw_header: bytes | None = None) -> Path:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def assert_one_line(err: pytest.ExceptionInfo[BaseException], *parts: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert "\r" not in msg, msg
    for p in parts:
        assert p in msg, (p, msg)
    return msg


# --------------------------------------------------------------------------------------------- round trip
def test_round_trip_all_dtypes(tmp_path: Path) -> None:
    t = sample_tensors()
    path = tmp_path / "rt.safetensors"
    save_tensors(path, t, {"a": "1", "b": "x y"})

    header = read_header(path)
    assert header.metadata == {"a": "1", "b": "x y"}
    assert header.file_size == path.stat().st_size
    assert set(header.tensors) == set(t)
    dtype_names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    dtype_names[torch.bool] = "BOOL"
    for name, entry in header.tensors.items():
        assert entry.dtype == dtype_names[t[name].dtype]
        assert entry.shape == tuple(t[name].shape)
        assert entry.nbytes == t[name].numel() * t[name].element_size()

    loaded = load_tensors(path)
    reference = load_file(str(path))  # safetensors' own reader agrees
    for name, v in t.items():
        assert loaded[name].dtype == v.dtype, name
        assert torch.equal(loaded[name], v), name
        assert torch.equal(reference[name], v), name

    sub = load_tensors(path, ["counts", "lora_unet_a.alpha"])
    assert list(sub) == ["counts", "lora_unet_a.alpha"]
    with pytest.raises(NotFoundError) as e:
        load_tensors(path, ["nope"])
    assert_one_line(e, "rt.safetensors", "'nope'")


def test_lazy_tensors(tmp_path: Path) -> None:
    t = sample_tensors()
    path = tmp_path / "lazy.safetensors"
    save_tensors(path, t, {"k": "v"})
    with LazyTensors(path) as lazy:
        assert len(lazy) == len(t)
        assert set(lazy) == set(t)
        assert "counts" in lazy
        assert "x" not in lazy
        assert lazy.metadata == {"k": "v"}
        assert lazy.header.tensors["counts"].shape == (5,)
        assert lazy._handle is None  # nothing opened before the first access
        assert torch.equal(lazy["lora_te_b.hada_w1_a"], t["lora_te_b.hada_w1_a"])
        assert all(torch.equal(v, t[k]) for k, v in lazy.items())
        with pytest.raises(KeyError):
            lazy["missing"]
    assert lazy._handle is None


def test_missing_file(tmp_path: Path) -> None:
    for fn in (read_header, load_tensors, payload_sha256, LazyTensors):
        with pytest.raises(NotFoundError) as e:
            fn(tmp_path / "absent.safetensors")
        assert_one_line(e, "absent.safetensors")


# --------------------------------------------------------------------------------------------- corrupt files
def _real_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "good.safetensors"
    save_tensors(path, sample_tensors(), {"ss_x": "1"})
    return path, path.read_bytes()


def test_truncated_files(tmp_path: Path) -> None:
    _, blob = _real_file(tmp_path)
    (n,) = struct.unpack("<Q", blob[:8])
    doc = json.loads(blob[8 : 8 + n])
    doc.pop("__metadata__")
    # offsets of non-empty tensors, to know which key a data-section cut lands in
    ends = sorted((e["data_offsets"][1], k) for k, e in doc.items() if e["data_offsets"][1] > e["data_offsets"][0])
    cuts = [0, 3, 7, 8, 12, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 5, len(blob) - 1]
    for cut in cuts:
        path = tmp_path / f"cut_{cut}.safetensors"
        path.write_bytes(blob[:cut])
        with pytest.raises(CorruptFileError) as e:
            read_header(path)
        msg = assert_one_line(e, path.name)
        if cut < 8:
            assert "8-byte" in msg
        elif cut < 8 + n:
            assert "header too large" in msg
        else:
            data_size = cut - 8 - n
            first_bad = next(k for end, k in ends if end > data_size)
            assert repr(first_bad) in msg
            assert "truncated" in msg
        with pytest.raises(CorruptFileError):
            load_tensors(path)
        with pytest.raises(Exception):  # noqa: B017 - safetensors itself refuses these files as well
            safe_open(str(path), "pt")


def test_huge_header_length(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CorruptFileError) as e:
        read_header(path)
    assert_one_line(e, "huge.safetensors", "header too large")
    # over the loader's limit but within the (sparse) file: still refused before anything is read
    with path.open("wb") as f:
        f.write(struct.pack("<Q", sio.MAX_HEADER_BYTES + 1) + b"{")
        f.truncate(sio.MAX_HEADER_BYTES + 100)
    with pytest.raises(CorruptFileError) as e:
        read_header(path)
    assert_one_line(e, "huge.safetensors", "header too large")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"this is not json", "not UTF-8 JSON"),
        (b'\xff\xfe{"a": 1}', "not UTF-8 JSON"),
        (b"[1, 2, 3]", "not an object"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "duplicate key"),
        (b'{"__metadata__": ["x"]}', "__metadata__"),
    ],
)
def test_bad_header_json(tmp_path: Path, raw: bytes, expected: str) -> None:
    path = write_raw(tmp_path / "bad.safetensors", None, b"\0" * 4, raw_header=raw)
    with pytest.raises(CorruptFileError) as e:
        read_header(path)
    assert_one_line(e, "bad.safetensors", expected)


def _read_all_with_safetensors(path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
            f.get_tensor(k)


F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


@pytest.mark.parametrize(
    ("header", "data_len", "key", "expected"),
    [
        ({"__metadata__": {"ss_dim": 8}}, 0, "ss_dim", "not a string"),
        ({"w": {"shape": [1], "data_offsets": [0, 4]}}, 4, "w", "dtype"),
        ({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, 4, "w", "shape"),
        ({"w": {"dtype": "F32", "shape": [1]}}, 4, "w", "data_offsets"),
        ({"w": "F32"}, 4, "w", "not a JSON object"),
        ({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 4]}}, 4, "w", "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "w", "shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, "w", "needs 8"),
        ({"w": {"dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}, 4, "w", "needs 2"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, 4, "w", "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, 4, "w", "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [96, 100]}}, 100, "w", "gap"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, 4, "w", "beyond the data section"),
        ({"a": F32_1, "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, 6, "b", "overlap"),
        ({"a": F32_1, "b": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, 4, "b", "overlap"),
        ({"a": F32_1}, 8, None, "belong to no tensor"),
    ],
)
def test_bad_entries(tmp_path: Path, header: dict, data_len: int, key: str | None, expected: str) -> None:
    path = write_raw(tmp_path / "entries.safetensors", header, b"\0" * data_len)
    with pytest.raises(CorruptFileError) as e:
        read_header(path)
    assert_one_line(e, "entries.safetensors", expected, *([repr(key)] if key else []))
    if "__metadata__" not in header:  # the safetensors loader refuses every one of these too
        with pytest.raises(Exception):  # noqa: B017
            _read_all_with_safetensors(path)


def test_key_with_newline_keeps_message_one_line(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "nl.safetensors", {"bad\nkey": {"dtype": "X", "shape": [], "data_offsets": [0, 0]}}, b""
    )
    with pytest.raises(CorruptFileError) as e:
        read_header(path)
    assert_one_line(e, "nl.safetensors", r"bad\nkey")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_refused(tmp_path: Path, dtype: torch.dtype, bad: float) -> None:
    t = {"fine": torch.ones(3), "lora_unet_x.lora_up.weight": torch.ones(4, 4, dtype=dtype)}
    t["lora_unet_x.lora_up.weight"][1, 2] = bad
    path = tmp_path / "nan.safetensors"
    save_tensors(path, t)
    read_header(path)  # the file itself is well-formed
    with pytest.raises(CorruptFileError) as e:
        load_tensors(path)
    assert_one_line(e, "nan.safetensors", "'lora_unet_x.lora_up.weight'", "NaN" if bad != bad else "1 Inf")
    with LazyTensors(path) as lazy:
        assert torch.equal(lazy["fine"], torch.ones(3))
        with pytest.raises(CorruptFileError):
            lazy["lora_unet_x.lora_up.weight"]
    assert load_tensors(path, check_finite=False)["lora_unet_x.lora_up.weight"].isfinite().sum() == 15
    assert load_tensors(path, ["fine"])["fine"].sum() == 3  # other keys stay loadable


# --------------------------------------------------------------------------------------------- writing
def test_overwrite_refused_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    save_tensors(path, {"a": torch.ones(2)}, {"v": "old"})
    before = path.read_bytes()
    with pytest.raises(FileExistsLycoError) as e:
        save_tensors(path, {"a": torch.zeros(2)}, {"v": "new"})
    assert_one_line(e, str(path), "exists", "overwrite")
    assert isinstance(e.value, FileExistsError)
    assert path.read_bytes() == before
    with pytest.raises(FileExistsLycoError):
        atomic_write_bytes(path, b"x")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]

    save_tensors(path, {"a": torch.zeros(2)}, {"v": "new"}, overwrite=True)
    assert read_header(path).metadata == {"v": "new"}
    assert torch.equal(load_tensors(path)["a"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_temp_file_location_and_name(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".")
        assert tmp.name.endswith(".tmp")
        assert tmp.exists()
        assert not target.exists()
        tmp.write_text("{}")
    assert target.read_text() == "{}"
    assert not tmp.exists()
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "f.json"]


@pytest.mark.parametrize("existing", [False, True])
def test_failed_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool) -> None:
    path = tmp_path / "x.safetensors"
    if existing:
        save_tensors(path, {"a": torch.ones(2)})
    before = path.read_bytes() if existing else None

    def boom(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        save_tensors(path, {"a": torch.zeros(1000)}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["x.safetensors"] if existing else [])
    if existing:
        assert path.read_bytes() == before


def test_failure_inside_writer_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\x10\x00\x00")  # a partial file, then a crash
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(sio, "_st_save_file", half_write)
    with pytest.raises(RuntimeError, match="mid-write"):
        save_tensors(tmp_path / "y.safetensors", {"a": torch.ones(3)})
    assert list(tmp_path.iterdir()) == []

    def failing_json_writer() -> None:
        with atomic_output(tmp_path / "z.json") as tmp:
            tmp.write_text("{partial")
            raise ValueError("json failed")

    with pytest.raises(ValueError, match="json failed"):
        failing_json_writer()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("metadata", [None, {}, {"k": "v"}])
def test_empty_tensor_dict(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    path = tmp_path / "empty.safetensors"
    save_tensors(path, {}, metadata)
    assert read_header(path).metadata == (metadata or {})
    assert load_tensors(path) == {}
    assert payload_sha256(path) == hashlib.sha256(b"").hexdigest()


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError) as e:
        save_tensors(tmp_path / "m.safetensors", {"a": torch.ones(1)}, {"ok": "1", "ss_network_dim": 8})  # type: ignore[dict-item]
    assert_one_line(e, "'ss_network_dim'")
    assert list(tmp_path.iterdir()) == []


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as e:
        save_tensors(tmp_path / "nodir" / "a.safetensors", {"a": torch.ones(1)})
    assert_one_line(e, "nodir")


def test_shared_storage_and_device_tensors_are_saved(tmp_path: Path) -> None:
    base = torch.randn(4, 4)
    t = {"w": base, "w_view": base[1:3], "w_t": base.t()}
    save_tensors(tmp_path / "s.safetensors", t)
    out = load_tensors(tmp_path / "s.safetensors")
    assert all(torch.equal(out[k], v) for k, v in t.items())


# --------------------------------------------------------------------------------------------- hashing
def a1111_addnet_hash(path: Path) -> str:
    """A1111 `addnet_hash_safetensors` (extensions-builtin/Lora, modules/hashes.py), written out here."""
    h = hashlib.sha256()
    with path.open("rb") as b:
        n = int.from_bytes(b.read(8), "little")
        b.seek(n + 8)
        for chunk in iter(lambda: b.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def kohya_sshs_model_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sd-scripts `precalculate_safetensors_hashes`: serialise with the ss_* metadata, skip 8 + N, sha256."""
    b = io.BytesIO(st_save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    return hashlib.sha256(b.read()).hexdigest()


def test_payload_hash_definitions(tmp_path: Path) -> None:
    t = {k: v.contiguous() for k, v in sample_tensors().items()}
    meta = {"ss_network_dim": "4", "modelspec.title": "x", "lyco.metadata": "{}"}
    path = tmp_path / "h.safetensors"
    save_tensors(path, t, meta)
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    expected = hashlib.sha256(blob[8 + n :]).hexdigest()
    assert payload_sha256(path) == expected
    assert a1111_addnet_hash(path) == expected
    assert kohya_sshs_model_hash(t, meta) == expected
    assert payload_sha256_of(t) == expected
    assert payload_sha256_of(sample_tensors()) == expected  # non-contiguous input: hashed as it will be written


def test_payload_hash_of_every_torch_dtype(tmp_path: Path) -> None:
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]
    dtypes += [torch.complex64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
    g = torch.Generator().manual_seed(3)
    t = {f"t{i:02d}_{str(d)[6:]}": (torch.randn(3, 5, generator=g) * 4).to(d) for i, d in enumerate(dtypes)}
    t["scalar"] = torch.tensor(0.5, dtype=torch.bfloat16)
    t["zero_size"] = torch.zeros(0, 7, dtype=torch.float16)
    save_tensors(tmp_path / "d.safetensors", t)
    blob = (tmp_path / "d.safetensors").read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    assert payload_sha256_of(t) == hashlib.sha256(blob[8 + n :]).hexdigest()
    loaded = load_tensors(tmp_path / "d.safetensors")
    assert all(loaded[k].dtype == v.dtype for k, v in t.items())
    assert all(torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)) for k, v in t.items() if v.dim())


def test_payload_hash_known_answer(tmp_path: Path) -> None:
    # Two F32 tensors: safetensors orders same-dtype tensors by name, so the data section is a then b.
    t = {"b": torch.tensor([3.0]), "a": torch.tensor([1.0, 2.0])}
    expected = hashlib.sha256(struct.pack("<3f", 1.0, 2.0, 3.0)).hexdigest()
    assert payload_sha256_of(t) == expected
    save_tensors(tmp_path / "k.safetensors", t)
    assert payload_sha256(tmp_path / "k.safetensors") == expected
    assert payload_sha256_of({}) == hashlib.sha256(b"").hexdigest()


def test_payload_hash_independent_of_metadata(tmp_path: Path) -> None:
    t = sample_tensors()
    p1, p2 = tmp_path / "m1.safetensors", tmp_path / "m2.safetensors"
    save_tensors(p1, t, {"ss_output_name": "one"})
    save_tensors(p2, t, {"ss_output_name": "a much longer name", "modelspec.title": "x" * 1000, "other": "y"})
    assert hashlib.sha256(p1.read_bytes()).digest() != hashlib.sha256(p2.read_bytes()).digest()
    assert payload_sha256(p1) == payload_sha256(p2) == payload_sha256_of(t)
    changed = dict(t, counts=torch.arange(5) + 1)
    assert payload_sha256_of(changed) != payload_sha256_of(t)


def test_payload_hash_streams_large_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sio, "_CHUNK", 1000)  # many chunks, an uneven last one
    t = {"big": torch.randn(3001)}
    save_tensors(tmp_path / "big.safetensors", t)
    blob = (tmp_path / "big.safetensors").read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    assert payload_sha256(tmp_path / "big.safetensors") == hashlib.sha256(blob[8 + n :]).hexdigest()


def test_atomic_output_dir_is_all_or_nothing(tmp_path: Path) -> None:
    from lyco_core.formats.safetensors_io import atomic_output_dir

    target = tmp_path / "out"
    with atomic_output_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not target.exists()  # nothing visible until the block ends
    assert (target / "a.txt").read_text() == "new"
    with pytest.raises(FileExistsLycoError), atomic_output_dir(target):
        pass

    def fail_midway() -> None:
        with atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("fails midway")

    with pytest.raises(RuntimeError):
        fail_midway()
    assert (target / "a.txt").read_text() == "new"  # the old folder is untouched
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("replaced")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old folders left
