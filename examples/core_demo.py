"""The core demo (`make demo`): build a small SD-style model and save it as a diffusers folder, attach a LoKr
adapter, train it a few steps, save it, then use the file operations on it: inspect, check against the base,
bake into the base folder (and compare the baked model with the adapter attached), extract a LoCon back.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

import lyco_core as lc


def build_models() -> tuple[UNet2DConditionModel, CLIPTextModelWithProjection]:
    """A UNet with the SD 1.x block layout at small width, and a small CLIP text encoder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    te = CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=32, projection_dim=64,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1)
    )
    return unet, te


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    ap.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    unet, te = build_models()
    base = out / "base_pipeline"
    if not base.exists():  # the base model as users have it on disk: a diffusers folder
        unet.save_pretrained(base / "unet")
        te.save_pretrained(base / "text_encoder")
        (base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for p in [*unet.parameters(), *te.parameters()]:
        p.requires_grad_(False)
    net = lc.create_network({"unet": unet, "te": te}, algo="lokr", preset="full", dim=100000, factor=4)
    print(f"[1/6] LoKr network: {len(net)} modules, {sum(p.numel() for p in net.trainable_parameters()):,} "
          f"trainable parameters")

    net.apply()
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 1000, (2, 12), generator=g)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    target = torch.randn(2, 4, 16, 16, generator=g)
    for step in range(args.steps):
        cond = te(tokens).last_hidden_state
        pred = unet(latents, torch.tensor([500, 700]), encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"      step {step + 1:3d}/{args.steps}  loss {loss.item():.4f}")

    adapter = out / "demo_lokr.safetensors"
    net.save(adapter, base_family="sd1", overwrite=True)
    print(f"[2/6] saved {adapter}")

    lyco = str(Path(sys.executable).with_name("lyco"))
    print("[3/6] lyco adapter inspect:")
    subprocess.run([lyco, "adapter", "inspect", str(adapter)], check=True)
    print("[4/6] lyco adapter check (does it fit the base on disk?):")
    subprocess.run([lyco, "adapter", "check", str(adapter), "--base", str(base)], check=True)

    with torch.no_grad():
        cond = te(tokens).last_hidden_state
        y_adapter = unet(latents, torch.tensor([500, 700]), encoder_hidden_states=cond).sample
    net.restore()

    baked = out / "baked_pipeline"
    print("[5/6] lyco adapter bake (streamed, keeps the diffusers layout):")
    subprocess.run([lyco, "adapter", "bake", str(base), str(adapter), "-o", str(baked), "--force"], check=True)
    unet2 = UNet2DConditionModel.from_pretrained(baked / "unet").eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(baked / "text_encoder").eval()
    with torch.no_grad():
        cond2 = te2(tokens).last_hidden_state
        y_baked = unet2(latents, torch.tensor([500, 700]), encoder_hidden_states=cond2).sample
    err = float((y_baked - y_adapter).abs().max())
    print(f"      baked model vs model with adapter attached: max |Δ| = {err:.2e}")

    print("[6/6] lyco adapter extract (a rank-8 LoCon back from base vs baked):")
    extracted = out / "extracted_locon.safetensors"
    subprocess.run(
        [lyco, "adapter", "extract", str(base), str(baked), "-o", str(extracted), "--rank", "8", "--conv-rank", "8",
         "--force"],
        check=True,
    )
    print("      (a full-dimension LoKr is far from low rank: that is the best rank-8 approximation's error)")
    print(f"done in {time.perf_counter() - t0:.1f} s; outputs in {out}/")
    return 0 if err < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
