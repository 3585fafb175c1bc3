"""lyco_core.ops.merge / `lyco adapter merge`: Σ wᵢ·ΔWᵢ exactly or SVD re-ranked, checked by baking in float64."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from adapter_files import base_weights, make_adapter, models
from checks import rel_err

from lyco_core.cli.adapter import merge as merge_cli
from lyco_core.errors import CorruptFileError, FileExistsLycoError, InvalidConfigError
from lyco_core.files import ModuleTensors, group_modules, read_adapter, write_adapter
from lyco_core.formats.safetensors_io import load_tensors
from lyco_core.layers import LayerInfo
from lyco_core.ops.merge import merge_adapters

Base = dict[str, tuple[torch.Tensor, torch.Tensor | None]]
W_A, W_B = 0.7, -0.3


@pytest.fixture(scope="module")
def base() -> Base:
    return base_weights()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("merge_inputs")
    model = models()
    specs = {"lora": "lora", "lora2": "lora", "loha": "loha", "loha2": "loha", "lokr": "lokr",
             "tucker": "lora-tucker", "tucker2": "lora-tucker", "full": "full", "dora": "lora-dora", "ia3": "ia3",
             "ia3b": "ia3", "dylora": "dylora", "full2": "full", "glora": "glora", "boft": "boft"}
    return {name: make_adapter(d / f"{name}.safetensors", v, seed=i + 1, model=model)
            for i, (name, v) in enumerate(specs.items())}


def change64(m: ModuleTensors, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W' − W, b' − b) of one module by lyco_core's exact merge rule, evaluated in float64."""
    layer = LayerInfo.from_weight(w.shape, b is not None)
    t = {k: (v.double() if v.is_floating_point() else v) for k, v in m.tensors.items()}
    w64, b64 = w.double(), None if b is None else b.double()
    new_w, new_b = m.algorithm.merge(w64, b64, t, layer, 1.0)
    return new_w - w64, None if new_b is None or b64 is None else new_b - b64


def expected(paths: list[Path], weights: list[float], base: Base) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Key → (Σ wᵢ·ΔWᵢ, Σ wᵢ·Δbᵢ) over the inputs that have the key."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for p, wt in zip(paths, weights, strict=True):
        for key, m in read_adapter(p).modules.items():
            w, b = base[key]
            dw, db = change64(m, w, b)
            dbias = torch.zeros(w.shape[0], dtype=torch.float64) if db is None else db
            old = out.get(key, (torch.zeros_like(dw), torch.zeros_like(dbias)))
            out[key] = (old[0] + wt * dw, old[1] + wt * dbias)
    return out


PAIRS = [("lora", "lora2"), ("lora", "loha"), ("loha", "loha2"), ("lokr", "lora"), ("tucker", "lora"),
         ("tucker", "tucker2"), ("full", "lora"), ("ia3", "ia3b"), ("dylora", "lora")]
#: output algorithm of the exact merge of each pair
ALGO = {("lora", "lora2"): "lora", ("lora", "loha"): "full", ("loha", "loha2"): "full", ("lokr", "lora"): "full",
        ("tucker", "lora"): "lora", ("tucker", "tucker2"): "lora", ("full", "lora"): "full", ("ia3", "ia3b"): "ia3",
        ("dylora", "lora"): "lora"}


@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_exact_merge(pair: tuple[str, str], files: dict[str, Path], base: Base, tmp_path: Path) -> None:
    paths = [files[pair[0]], files[pair[1]]]
    out = tmp_path / "m.safetensors"
    report = merge_adapters(paths, out, weights=[W_A, W_B])
    exp = expected(paths, [W_A, W_B], base)
    merged = read_adapter(out)
    assert set(merged.modules) == set(exp)
    assert merged.algorithms() == {ALGO[pair]: len(exp)}
    for key, m in merged.modules.items():
        w, b = base[key]
        dw, db = change64(m, w, b)
        assert rel_err(dw, exp[key][0]) <= 1e-5, key
        assert float((db if db is not None else torch.zeros_like(exp[key][1])).sub(exp[key][1]).abs().max()) < 1e-6
        assert report.modules[key].rel_error is None
    if ALGO[pair] == "lora":  # ranks add up; α = total rank (scale 1)
        for m in merged.modules.values():
            assert m.algorithm.rank(m.tensors) == 8
            assert float(m.tensors["alpha"]) == 8.0
    if pair == ("tucker", "tucker2"):
        mids = [m.tensors["lora_mid.weight"] for m in merged.modules.values() if "lora_mid.weight" in m.tensors]
        assert mids
        assert all(float(mid[:4, 4:].abs().max()) == 0.0 for mid in mids)  # block diagonal
    if pair == ("full", "lora"):  # the Full input's bias changes survive
        assert any("diff_b" in m.tensors for m in merged.modules.values())


def test_lora_output_loads_in_lycoris_naming(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    merge_adapters([files["lora"], files["lora2"]], out)
    tensors = load_tensors(out)
    assert {k.split(".", 1)[1] for k in tensors} == {"lora_up.weight", "lora_down.weight", "alpha"}
    modules, unknown = group_modules(tensors)
    assert not unknown
    assert {m.algorithm.name for m in modules.values()} == {"lora"}
    # LyCORIS 4.1.3's LoCon module takes every merged module's tensors as they are and rebuilds the same ΔW
    from lycoris.modules.locon import LoConModule

    for key, m in read_adapter(out).modules.items():
        shape = m.algorithm.implied_weight_shape(m.tensors)
        assert shape is not None
        layer: torch.nn.Module = (
            torch.nn.Linear(shape[1], shape[0]) if len(shape) == 2 else torch.nn.Conv2d(shape[1], shape[0], shape[2:])
        )
        r = m.algorithm.rank(m.tensors)
        mod = LoConModule(key, layer, lora_dim=r, alpha=float(m.tensors["alpha"]))
        mod.load_state_dict({**m.tensors, "org_module.0.weight": layer.weight}, strict=False)
        missing = {k for k in mod.state_dict() if k.startswith("lora_") or k == "alpha"} - set(m.tensors)
        assert not missing, key
        theirs = mod.get_diff_weight()[0].double().reshape(shape)
        assert rel_err(theirs, m.delta_weight(torch.zeros(shape)).double()) < 1e-6, key


@pytest.mark.parametrize("pair", [("lora", "lora2"), ("lora", "loha"), ("tucker", "lora")], ids="+".join)
def test_rank_merge_reports_eckart_young_error(
    pair: tuple[str, str], files: dict[str, Path], base: Base, tmp_path: Path
) -> None:
    paths = [files[pair[0]], files[pair[1]]]
    out = tmp_path / "r.safetensors"
    report = merge_adapters(paths, out, weights=[W_A, W_B], rank=3, conv_rank=5)
    exp = expected(paths, [W_A, W_B], base)
    merged = read_adapter(out)
    assert merged.algorithms() == {"lora": len(exp)}
    for key, m in merged.modules.items():
        w, b = base[key]
        got = change64(m, w, b)[0]
        target = exp[key][0]
        flat = target.reshape(target.shape[0], -1)
        r = min(5 if target.ndim == 4 and target.shape[2] > 1 else 3, *flat.shape)
        s = torch.linalg.svdvals(flat)
        optimum = float(s[r:].norm() / s.norm())
        assert m.algorithm.rank(m.tensors) == r
        assert report.modules[key].rank == r
        assert report.modules[key].rel_error == pytest.approx(rel_err(got, target), rel=1e-3, abs=1e-6), key
        assert report.modules[key].rel_error == pytest.approx(optimum, rel=1e-3, abs=1e-6), key


@pytest.mark.parametrize("variant", ["dora", "glora", "boft"])
def test_base_dependent_modules(variant: str, files: dict[str, Path], base: Base, tmp_path: Path) -> None:
    paths = [files[variant], files["lora"]]
    first = sorted(read_adapter(files[variant]).modules)[0]
    with pytest.raises(InvalidConfigError, match=f"{first}.*depends on the base"):
        merge_adapters(paths, tmp_path / "a.safetensors", weights=[W_A, W_B])
    with pytest.raises(InvalidConfigError, match="no module left"):
        merge_adapters(paths, tmp_path / "a.safetensors", weights=[W_A, W_B], allow_drop=True)
    out = tmp_path / "b.safetensors"
    merge_adapters(paths, out, weights=[W_A, W_B], base=base)
    exp = expected(paths, [W_A, W_B], base)
    merged = read_adapter(out)
    assert merged.algorithms() == {"full": len(exp)}
    for key, m in merged.modules.items():
        w, b = base[key]
        assert rel_err(change64(m, w, b)[0], exp[key][0]) <= 1e-5, key
    # (IA)³ mixed with LoRA also needs the base; (IA)³ + (IA)³ does not (covered above)
    with pytest.raises(InvalidConfigError, match="ia3"):
        merge_adapters([files["ia3"], files["lora"]], tmp_path / "c.safetensors")


def test_single_nonlinear_module(files: dict[str, Path], base: Base, tmp_path: Path) -> None:
    """A DoRA file alone at weight 1 is copied; at another weight it needs the base (DoRA is not linear in μ)."""
    report = merge_adapters([files["dora"]], tmp_path / "a.safetensors")
    assert read_adapter(tmp_path / "a.safetensors").tensors().keys() == read_adapter(files["dora"]).tensors().keys()
    assert all(m.note and m.note.endswith("copied") for m in report.modules.values())
    with pytest.raises(InvalidConfigError, match="depends on the base"):
        merge_adapters([files["dora"]], tmp_path / "b.safetensors", weights=[0.5])
    merge_adapters([files["dora"]], tmp_path / "c.safetensors", weights=[0.5], base=base)
    src, out = read_adapter(files["dora"]).modules, read_adapter(tmp_path / "c.safetensors").modules
    for key, m in out.items():
        w, b = base[key]
        assert rel_err(change64(m, w, b)[0], 0.5 * change64(src[key], w, b)[0]) <= 1e-5


def test_full_and_norm_sums(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "f.safetensors"
    merge_adapters([files["full"], files["full2"]], out, weights=[W_A, W_B])
    a, b, m = (read_adapter(p).modules for p in (files["full"], files["full2"], out))
    for key, mod in m.items():
        assert mod.algorithm.name == "full"
        for n in ("diff", "diff_b"):
            if n in a[key].tensors:
                want = W_A * a[key].tensors[n].double() + W_B * b[key].tensors[n].double()
                assert rel_err(mod.tensors[n].double(), want) < 1e-6
    norms = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        t = {"x.w_norm": torch.randn(8, generator=g), "x.b_norm": torch.randn(8, generator=g)}
        norms.append(dict(t))
        write_adapter(tmp_path / f"n{i}.safetensors", group_modules({k.replace("x", "lora_unet_norm"): v
                                                                      for k, v in t.items()})[0])
    merge_adapters([tmp_path / "n0.safetensors", tmp_path / "n1.safetensors"], tmp_path / "n.safetensors",
                   weights=[W_A, W_B], rank=2)
    got = read_adapter(tmp_path / "n.safetensors").modules["lora_unet_norm"]
    assert got.algorithm.name == "norm"
    for n in ("w_norm", "b_norm"):
        assert torch.allclose(got.tensors[n], W_A * norms[0][f"x.{n}"] + W_B * norms[1][f"x.{n}"])


def test_partial_overlap_and_dropping(files: dict[str, Path], base: Base, tmp_path: Path) -> None:
    """Modules in only one input are carried over scaled; unsupported ones are dropped only when asked."""
    a, d = read_adapter(files["loha"]).modules, read_adapter(files["dora"]).modules
    keys = sorted(a)
    only_a = {k: a[k] for k in keys[: len(keys) // 2]}
    mixed = {k: (d[k] if i % 3 == 0 else a[k]) for i, k in enumerate(keys[len(keys) // 3:])}
    write_adapter(tmp_path / "a.safetensors", only_a)
    write_adapter(tmp_path / "b.safetensors", mixed)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    report = merge_adapters(paths, tmp_path / "m.safetensors", weights=[W_A, W_B], allow_drop=True)
    dora_keys = {k for k, m in mixed.items() if "dora_scale" in m.tensors}
    assert set(report.dropped) == dora_keys
    merged = read_adapter(tmp_path / "m.safetensors")
    assert set(merged.modules) == (set(only_a) | set(mixed)) - dora_keys
    for key, m in merged.modules.items():
        w, b = base[key]
        exp = torch.zeros_like(w, dtype=torch.float64)
        if key in only_a:
            exp += W_A * change64(only_a[key], w, b)[0]
        if key in mixed:
            exp += W_B * change64(mixed[key], w, b)[0]
        assert rel_err(change64(m, w, b)[0], exp) <= 1e-5, key
        if (key in only_a) != (key in mixed):
            assert m.algorithm.name == "loha"  # a lone module keeps its algorithm, scaled
            assert "scaled" in (report.modules[key].note or "")


def test_bad_inputs(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="--weights"):
        merge_adapters([files["lora"], files["lora2"]], tmp_path / "x.safetensors", weights=[1.0])
    with pytest.raises(InvalidConfigError, match="--rank"):
        merge_adapters([files["lora"], files["lora2"]], tmp_path / "x.safetensors", rank=0)
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsLycoError):
        merge_adapters([files["lora"], files["lora2"]], out)
    assert out.read_bytes() == b"keep"
    # same key, different layers
    m = read_adapter(files["lora"]).modules
    k1, k2 = "lora_unet_conv_in", "lora_unet_down_blocks_0_resnets_0_conv1"
    assert m[k1].tensors["lora_down.weight"].shape != m[k2].tensors["lora_down.weight"].shape
    write_adapter(tmp_path / "wrong.safetensors", {k1: ModuleTensors(k1, m[k2].algorithm, m[k2].tensors)})
    with pytest.raises(CorruptFileError, match=k1):
        merge_adapters([files["lora"], tmp_path / "wrong.safetensors"], tmp_path / "y.safetensors")


def test_cli(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    merge_cli.register(parser.add_subparsers())
    out = tmp_path / "cli.safetensors"
    args = parser.parse_args(["merge", str(files["lora"]), str(files["loha"]), "-o", str(out), "--weights", "0.7",
                              "-0.3", "--rank", "2", "--dtype", "fp16", "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["operation"] == "merge"
    assert {m["rank"] for m in report["modules"].values()} == {2}
    assert all(m["rel_error"] is not None for m in report["modules"].values())
    merged = read_adapter(out)
    assert {t.dtype for m in merged.modules.values() for t in m.tensors.values()} == {torch.float16}
    args = parser.parse_args(["merge", str(files["lora"]), str(files["lora2"]), "-o", str(out)])
    with pytest.raises(FileExistsLycoError):
        args.func(args)
