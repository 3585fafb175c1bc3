"""`lyco adapter rescale`: multiplier folding (checked by merging on the base weights, and in LyCORIS) and
alpha changes that keep ΔW."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from adapter_files import PRESET, VARIANTS, base_weights, make_adapter, models
from checkpoints import save_pipeline
from checks import rel_err
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from lycoris.utils.preset import read_preset
from tiny_sd import tiny_clip_text_with_projection, tiny_sd1_unet

import lyco_core as lc
from lyco_core.cli.adapter import rescale as rescale_cli
from lyco_core.errors import FileExistsLycoError, IncompatibleBaseError, InvalidConfigError
from lyco_core.formats.safetensors_io import payload_sha256, save_tensors
from lyco_core.ops.rescale import rescale_adapter

Base = dict[str, tuple[torch.Tensor, torch.Tensor | None]]
NONLINEAR = {"lora-dora", "diag-oft", "boft"}


@pytest.fixture(scope="module")
def base() -> Base:
    return base_weights()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """variant → an adapter file made once for this module (tests only read it)."""
    folder = tmp_path_factory.mktemp("sources")
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            made[variant] = make_adapter(folder / f"{variant}.safetensors", variant)
        return made[variant]

    return get


def _delta_err(got: torch.Tensor, expected: torch.Tensor, w: torch.Tensor) -> float:
    """‖got − expected‖ relative to the change ‖expected − W‖ (to ‖W‖ when there is no change)."""
    change = (expected - w).norm()
    return float((got - expected).norm() / (change if change > 0 else w.norm()))


def _check_folded(original: lc.AdapterFile, out: lc.AdapterFile, base: Base, m: float) -> None:
    """OUT at strength 1 equals ORIGINAL at strength m, module by module, on the base weights."""
    assert set(out.modules) == set(original.modules)
    worst = 0.0
    for key, mod in original.modules.items():
        w, b = base[key]
        exp_w, exp_b = mod.merge(w, b, m)
        got_w, got_b = out.modules[key].merge(w, b, 1.0)
        if m == 0:
            assert torch.equal(got_w, w), key
        worst = max(worst, _delta_err(got_w, exp_w, w))
        if exp_b is not None:
            assert got_b is not None, key
            worst = max(worst, _delta_err(got_b, exp_b, b if b is not None else torch.zeros_like(exp_b)))
    assert worst <= 1e-5, f"worst relative error {worst:.2e} at multiplier {m}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_out_at_one_equals_file_at_multiplier(
    variant: str, tmp_path: Path, base: Base, source: Callable[[str], Path]
) -> None:
    src = source(variant)
    original = lc.read_adapter(src)
    # the multiplier must matter for this test to mean anything
    key = next(iter(sorted(original.modules)))
    w, b = base[key]
    assert rel_err(original.modules[key].merge(w, b, 0.5)[0] - w, original.modules[key].merge(w, b, 1.0)[0] - w) > 0.1
    for m in (0.5, -1.25, 0.0):
        out = tmp_path / f"out{m}.safetensors"
        report = rescale_adapter(src, out, multiplier=m, base=base if variant in NONLINEAR else None)
        assert report.output == str(out)
        assert len(report.modules) == len(original.modules)
        rescaled = lc.read_adapter(out)
        _check_folded(original, rescaled, base, m)
        assert rescaled.header["ss_training_comment"].startswith(f"rescaled ×{m:g}")
        assert rescaled.header["sshs_model_hash"] == payload_sha256(out)
        if variant in NONLINEAR:
            assert rescaled.algorithms() == {"full": len(original.modules)}
            assert any("exact only for the given base" in w for w in report.warnings)
        else:
            assert rescaled.algorithms() == original.algorithms()


@pytest.mark.parametrize("variant", sorted(NONLINEAR))
def test_nonlinear_modules_need_base(variant: str, tmp_path: Path, source: Callable[[str], Path]) -> None:
    src = source(variant)
    out = tmp_path / "out.safetensors"
    first = sorted(lc.read_adapter(src).modules)[0]
    with pytest.raises(InvalidConfigError, match="--base") as e:
        rescale_adapter(src, out, multiplier=0.5)
    assert first in str(e.value)
    assert "\n" not in str(e.value)
    assert not out.exists()
    # multiplier 1 changes nothing, so no base is needed and the tensors are copied
    rescale_adapter(src, out, multiplier=1.0)
    a, b = lc.read_adapter(src).tensors(), lc.read_adapter(out).tensors()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


class FakeCheckpoint:
    """What rescale uses of the lead's BaseCheckpoint: ``resolve`` (aliases → canonical) and ``weight``."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self.resolved: list[str] = []

    def resolve(self, key: str) -> str | None:
        self.resolved.append(key)
        return key.removeprefix("alias_") if key.removeprefix("alias_") in self.base else None

    def weight(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.base[key]
        return w.half(), None if b is None else b.half()  # a half-precision checkpoint


def test_checkpoint_base_and_missing_layer(tmp_path: Path, base: Base, source: Callable[[str], Path]) -> None:
    src = source("diag-oft")
    ckpt = FakeCheckpoint(base)
    out = tmp_path / "out.safetensors"
    rescale_adapter(src, out, multiplier=-0.5, base=ckpt)
    assert ckpt.resolved, "rescale must resolve file keys through the checkpoint"
    # exact for the weights the checkpoint holds (fp16 values, computed in float32)
    half = {k: (w.half().float(), None if b is None else b.half().float()) for k, (w, b) in base.items()}
    _check_folded(lc.read_adapter(src), lc.read_adapter(out), half, -0.5)

    partial = {k: v for i, (k, v) in enumerate(sorted(base.items())) if i % 2}
    with pytest.raises(IncompatibleBaseError, match="no layer for this module"):
        rescale_adapter(src, tmp_path / "o2.safetensors", multiplier=2.0, base=FakeCheckpoint(partial))
    assert not (tmp_path / "o2.safetensors").exists()


ALPHA_VARIANTS = ["lora", "lora-tucker", "lora-dora", "loha", "lokr", "lokr-full", "glora", "ia3", "full",
                  "diag-oft"]


@pytest.mark.parametrize("variant", ALPHA_VARIANTS)
def test_alpha_change_keeps_delta(
    variant: str, tmp_path: Path, base: Base, source: Callable[[str], Path]
) -> None:
    src = source(variant)
    out = tmp_path / "out.safetensors"
    report = rescale_adapter(src, out, alpha=7.0)
    original, changed = lc.read_adapter(src), lc.read_adapter(out)
    n_changed = 0
    for key, mod in original.modules.items():
        new = changed.modules[key]
        w, b = base[key]
        for mu in (1.0, 0.6):
            assert _delta_err(new.merge(w, b, mu)[0], mod.merge(w, b, mu)[0], w) <= 1e-5, (key, mu)
        note = report.modules[key].note or ""
        if "alpha" in new.tensors and float(new.tensors["alpha"]) == 7.0:
            n_changed += 1
            assert "→ 7" in note
            assert mod.algorithm.scale(mod.tensors) != new.algorithm.scale(new.tensors)
        else:
            assert note.startswith("unchanged:"), note
            assert all(torch.equal(mod.tensors[n], new.tensors[n]) for n in mod.tensors)
    if variant in ("ia3", "full", "diag-oft", "lokr-full"):
        assert n_changed == 0
        assert report.warnings
        if variant == "lokr-full":
            assert all("full-matrix" in (r.note or "") for r in report.modules.values())
    else:  # LoKr modules on small layers are full-matrix (both halves full) even at dim 4
        full_matrix = [m for m in original.modules.values() if m.describe().get("w2") == "full"
                       and m.describe().get("w1") == "full"]
        assert 0 < n_changed == len(original.modules) - len(full_matrix)


def _lora(rank: int, alpha: float | None, out: int = 6, inp: int = 5) -> dict[str, torch.Tensor]:
    t = {"lora_down.weight": torch.randn(rank, inp), "lora_up.weight": torch.randn(out, rank)}
    if alpha is not None:
        t["alpha"] = torch.tensor(alpha)
    return t


def test_alpha_missing_and_zero(tmp_path: Path) -> None:
    tensors = {f"lora_unet_a.{k}": v for k, v in _lora(4, None).items()}
    tensors |= {f"lora_unet_b.{k}": v for k, v in _lora(4, 0.0).items()}
    tensors |= {f"lora_unet_c.{k}": v for k, v in _lora(4, 2.0).items()}
    src = tmp_path / "in.safetensors"
    save_tensors(src, tensors)
    out = tmp_path / "out.safetensors"
    report = rescale_adapter(src, out, alpha=1.0)
    f = lc.read_adapter(out)
    w = torch.randn(6, 5)
    # missing alpha = scale 1 in every consumer: now alpha 1 with up ×4 (scale 1/4)
    assert float(f.modules["lora_unet_a"].tensors["alpha"]) == 1.0
    torch.testing.assert_close(f.modules["lora_unet_a"].delta_weight(w),
                               tensors["lora_unet_a.lora_up.weight"] @ tensors["lora_unet_a.lora_down.weight"])
    # alpha 0 means different things to different consumers: left alone
    assert float(f.modules["lora_unet_b"].tensors["alpha"]) == 0.0
    assert report.modules["lora_unet_b"].note.startswith("unchanged: alpha 0")  # type: ignore[union-attr]
    torch.testing.assert_close(f.modules["lora_unet_c"].delta_weight(w),
                               0.5 * tensors["lora_unet_c.lora_up.weight"] @ tensors["lora_unet_c.lora_down.weight"])
    with pytest.raises(InvalidConfigError, match="--alpha"):
        rescale_adapter(src, tmp_path / "x.safetensors", alpha=0.0)


def test_norm_full_and_half_precision(tmp_path: Path) -> None:
    tensors = {"lora_unet_n.w_norm": torch.randn(8), "lora_unet_n.b_norm": torch.randn(8),
               **{f"lora_unet_l.{k}": v.half() for k, v in _lora(2, 1.0).items()}}
    src = tmp_path / "in.safetensors"
    save_tensors(src, tensors)
    out = tmp_path / "out.safetensors"
    rescale_adapter(src, out, multiplier=-1.25)
    f = lc.read_adapter(out)
    n = f.modules["lora_unet_n"]
    assert n.algorithm.name == "norm"
    w, b = torch.randn(8), torch.randn(8)
    nw, nb = n.merge(w, b, 1.0)
    torch.testing.assert_close(nw, w - 1.25 * tensors["lora_unet_n.w_norm"])
    torch.testing.assert_close(nb, b - 1.25 * tensors["lora_unet_n.b_norm"])
    up = f.modules["lora_unet_l"].tensors["lora_up.weight"]
    assert up.dtype == torch.float16  # dtype kept
    assert torch.equal(up, (tensors["lora_unet_l.lora_up.weight"].float() * -1.25).half())
    rescale_adapter(src, out, multiplier=2.0, dtype=torch.bfloat16, overwrite=True)
    assert {t.dtype for t in lc.read_adapter(out).tensors().values()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------ LyCORIS as a consumer
def _run(unet: torch.nn.Module, te: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, 100, (2, 7), generator=g)
    with torch.no_grad():
        cond = te(tokens).last_hidden_state
        return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 50]), encoder_hidden_states=cond).sample


def _lycoris_forward(path: Path, multiplier: float) -> torch.Tensor:
    unet, te = tiny_sd1_unet(cross_attention_dim=16), tiny_clip_text_with_projection()
    net, _ = create_network_from_weights(multiplier, str(path), None, te, unet, for_inference=True)
    net.apply_to(te, unet, True, True)
    return _run(unet, te)


@pytest.mark.parametrize("variant", ["lora", "loha", "lokr"])
def test_lycoris_loads_rescaled_file(variant: str, tmp_path: Path) -> None:
    model = {"unet": tiny_sd1_unet(cross_attention_dim=16), "te": tiny_clip_text_with_projection()}
    src = make_adapter(tmp_path / "in.safetensors", variant, model=model, alpha=1.0)
    out = tmp_path / "out.safetensors"
    rescale_adapter(src, out, multiplier=-1.25)
    preset = tmp_path / "preset.toml"
    preset.write_text(
        "enable_conv = true\n"
        f"unet_target_module = {json.dumps(PRESET['unet']['target_module'])}\n"
        f"unet_target_name = {json.dumps(PRESET['unet']['target_name'])}\n"
        f"text_encoder_target_module = {json.dumps(PRESET['text_encoder']['target_module'])}\n"
    )
    LycorisNetworkKohya.apply_preset(read_preset(str(preset)))
    expected = _lycoris_forward(src, -1.25)
    got = _lycoris_forward(out, 1.0)
    assert rel_err(got, expected) < 1e-5
    assert rel_err(_lycoris_forward(src, 1.0), expected) > 1e-3, "the multiplier must matter"


# ------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lyco adapter")
    rescale_cli.register(p.add_subparsers())
    return p


def test_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], base: Base, source: Callable[[str], Path]
) -> None:
    src = source("loha")
    out = tmp_path / "out.safetensors"
    args = _parser().parse_args(["rescale", str(src), "-o", str(out), "--multiplier", "0.5", "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["operation"] == "rescale"
    assert report["output"] == str(out)
    assert report["modules"]["lora_unet_conv_in"]["note"] == "hada_w1_a ×0.5"
    _check_folded(lc.read_adapter(src), lc.read_adapter(out), base, 0.5)
    with pytest.raises(FileExistsLycoError):
        args.func(args)
    args = _parser().parse_args(["rescale", str(src), "-o", str(out), "--alpha", "8", "--force", "--dtype", "fp16"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("rescale: 291 module(s)")
    assert "alpha 2 → 8" in text
    assert lc.read_adapter(out).modules["lora_unet_conv_in"].tensors["hada_w1_a"].dtype == torch.float16
    for bad in (["--multiplier", "1", "--alpha", "2"], []):
        with pytest.raises(SystemExit):
            _parser().parse_args(["rescale", str(src), "-o", str(out), *bad])


def test_cli_base_folder(tmp_path: Path, base: Base, source: Callable[[str], Path]) -> None:
    src = source("lora-dora")
    out = tmp_path / "out.safetensors"
    args = _parser().parse_args(["rescale", str(src), "-o", str(out), "--multiplier", "-0.5"])
    with pytest.raises(InvalidConfigError, match="needs the base model \\(--base BASE\\)"):
        args.func(args)
    model = models()
    folder = save_pipeline(tmp_path / "pipe", model["unet"], model["te"])
    args = _parser().parse_args(["rescale", str(src), "-o", str(out), "--multiplier", "-0.5", "--base", str(folder)])
    assert args.func(args) == 0
    _check_folded(lc.read_adapter(src), lc.read_adapter(out), base, -0.5)
