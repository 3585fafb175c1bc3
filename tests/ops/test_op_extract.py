"""`lyco adapter extract`: ΔW of two checkpoints → LoRA/LoCon, checked by baking and against full SVD / LyCORIS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_files import make_adapter, models
from checkpoints import ldm_state_dict, save_ldm, save_pipeline
from checks import rel_err
from lycoris.utils import extract_linear

import lyco_core as lc
from lyco_core.checkpoint import open_base
from lyco_core.cli.main import main
from lyco_core.errors import InvalidConfigError
from lyco_core.ops.extract import extract_adapter


def _pair(tmp_path: Path, variant: str = "lora") -> tuple[Path, Path, dict[str, torch.nn.Module]]:
    """A base pipeline and a 'fine-tuned' one: the base with a ``variant`` adapter merged in."""
    adapter = make_adapter(tmp_path / "a.safetensors", variant)
    m = models()
    base = save_pipeline(tmp_path / "base", m["unet"], m["te"])
    tuned = models()
    net, _ = lc.load_network(adapter, tuned)
    net.merge()
    tuned_dir = save_pipeline(tmp_path / "tuned", tuned["unet"], tuned["te"])
    return base, tuned_dir, tuned


def test_exact_rank_recovers_the_tuned_weights(tmp_path: Path) -> None:
    base, tuned_dir, _ = _pair(tmp_path)
    out = tmp_path / "x.safetensors"
    report = extract_adapter(base, tuned_dir, out, rank=4, conv_rank=4)
    f = lc.read_adapter(out)
    assert set(f.modules) == set(report.modules)
    # kohya's LoCon set on this UNet: attention + resnet/sampler layers, and the TE's attention/MLP
    assert len(f.modules) == 291 - 2  # the adapter also had conv_in/conv_out, which extract does not target
    assert max(m.rel_error or 0.0 for m in report.modules.values()) < 1e-4
    # baking the extracted file into the base gives the tuned weights on every extracted layer
    with open_base(base) as b0, open_base(tuned_dir) as b1:
        for key, module in f.modules.items():
            w0, bias0 = b0.weight(key)
            w1, _ = b1.weight(key)
            assert rel_err(module.merge(w0, bias0)[0] - w0, w1 - w0) < 1e-4, key


def test_lower_rank_is_eckart_young_and_matches_lycoris(tmp_path: Path) -> None:
    base, tuned_dir, _ = _pair(tmp_path, "loha")  # LoHa ΔW has rank up to 16: rank 2 must approximate
    out = tmp_path / "x.safetensors"
    report = extract_adapter(base, tuned_dir, out, rank=2, method="full", text_encoder=False)
    f = lc.read_adapter(out)
    with open_base(base) as b0, open_base(tuned_dir) as b1:
        for key in list(f.modules)[:40]:
            w0, _ = b0.weight(key)
            w1, _ = b1.weight(key)
            d = (w1 - w0).float()
            s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
            optimum = float(s[2:].norm() / s.norm())
            got = rel_err(f.modules[key].delta_weight(w0), d)
            assert got == pytest.approx(optimum, rel=1e-3, abs=1e-6), key
            assert report.modules[key].rel_error == pytest.approx(got, rel=1e-3, abs=1e-6)
            if d.ndim == 2:  # LyCORIS's extractor (full SVD) reaches the same error
                (down, up, _), how = extract_linear(d, "fixed", 2)
                assert how == "low rank"
                assert rel_err(up @ down, d) == pytest.approx(got, rel=1e-3, abs=1e-6)


def test_dynamic_rank_and_mixed_layouts(tmp_path: Path) -> None:
    _, tuned_dir, _ = _pair(tmp_path, "loha")
    m = models()
    ldm = save_ldm(tmp_path / "base.safetensors", ldm_state_dict(m["unet"], m["te"]))
    out = tmp_path / "x.safetensors"
    report = extract_adapter(ldm, tuned_dir, out, mode="ratio", param=0.1, method="full")
    ranks = {r.rank for r in report.modules.values() if r.algo == "lora"}
    assert len(ranks) > 1  # the rule picks per-module ranks
    with open_base(ldm) as b0, open_base(tuned_dir) as b1:
        key = next(k for k, r in report.modules.items() if r.algo == "lora")
        d = (b1.weight(key)[0] - b0.weight(key)[0]).float()
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
        assert report.modules[key].rank == int((s > 0.1 * s[0]).sum())


def test_unchanged_layers_skipped_bad_options_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = models()
    base = save_pipeline(tmp_path / "base", m["unet"], m["te"])
    with pytest.raises(InvalidConfigError, match="--rank"):
        extract_adapter(base, base, tmp_path / "x.safetensors")
    with pytest.raises(InvalidConfigError, match="--param"):
        extract_adapter(base, base, tmp_path / "x.safetensors", mode="ratio")
    report = extract_adapter(base, base, tmp_path / "x.safetensors", rank=4)
    assert not report.modules
    assert all(v.startswith("unchanged") for v in report.dropped.values())
    assert main(["adapter", "extract", str(base), str(base), "-o", str(tmp_path / "x.safetensors"), "--rank", "4"]) == 2
    assert "exists" in capsys.readouterr().err
