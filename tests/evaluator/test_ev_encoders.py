"""Encoders of the evaluator: preprocessing as the official code, DINOv2/CLIP against transformers' own forward,
VGG19 in torchvision's layout (pre-ReLU taps, the official code's in-place ReLU quirk), loading errors, the cache."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from lyco_core.errors import CorruptFileError, InvalidConfigError, NotFoundError, UnknownFormatError
from lyco_evaluator.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipEncoder,
    FeatureCache,
    cached_image_features,
    cached_image_values,
    cached_text_features,
    load_encoder,
    preprocess,
    preprocess_generated,
    preprocess_reference,
    resize_image,
    write_tiny_encoder,
)
from lyco_evaluator.encoders.clip import _tiny_tokenizer
from lyco_evaluator.encoders.vgg import conv_indices

IMAGENET_M = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
IMAGENET_S = torch.tensor(IMAGENET_STD).view(3, 1, 1)

#: torchvision vgg19().features conv indices and (out, in) widths, written out independently of the module.
TV_VGG19_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
                  14: (256, 256), 16: (256, 256), 19: (512, 256), 21: (512, 512), 23: (512, 512), 25: (512, 512),
                  28: (512, 512), 30: (512, 512), 32: (512, 512), 34: (512, 512)}
TV_POOLS = {4, 9, 18, 27, 36}


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _solid(w: int, h: int, rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (w, h), rgb)


def _norm(rgb: tuple[float, float, float], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return (torch.tensor(rgb) - torch.tensor(mean)) / torch.tensor(std)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_noise(64, 48, 1), _noise(48, 64, 2), _noise(40, 40, 3)]


# ----------------------------------------------------------------------------------------------- preprocessing
def test_resize_matches_transformers_pil_processor() -> None:
    # transformers' PIL CLIP processor (resize to H×W bicubic, /255, normalise) is an independent implementation.
    img = _noise(64, 48)
    proc = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False, resample=3,
                                 image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    want = proc(images=img, return_tensors="pt")["pixel_values"][0]
    got = preprocess_generated(img, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert got.shape == (3, 32, 32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("w", "h"), [(64, 48), (37, 20), (20, 37)])
def test_crop_matches_transformers_shortest_edge_center_crop(w: int, h: int) -> None:
    img = _noise(w, h)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, resample=3,
                                 image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    want = proc(images=img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(preprocess(img, 16, "crop"), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("w", "h", "content_rows", "content_cols"),
    [
        (40, 20, (4, 12), (0, 16)),  # 40×20 → 16×8, pad 8 rows: 4 above, 4 below
        (30, 17, (3, 12), (0, 16)),  # 17·16/30 = 9.07 → 9 rows, pad 7: floor(7/2) = 3 above, 4 below
        (32, 21, (3, 13), (0, 16)),  # 21·0.5 = 10.5 → round-half-even 10, pad 6: 3 + 3
        (17, 30, (0, 16), (3, 12)),  # portrait: pad columns, left gets floor(7/2) = 3
    ],
)
def test_padding_geometry_black_borders(
    w: int, h: int, content_rows: tuple[int, int], content_cols: tuple[int, int]
) -> None:
    red = (255, 0, 0)
    x = preprocess_reference(_solid(w, h, red), 16)
    assert x.shape == (3, 16, 16)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[content_rows[0] : content_rows[1], content_cols[0] : content_cols[1]] = True
    torch.testing.assert_close(x[:, inside], _norm((1.0, 0.0, 0.0))[:, None].expand(3, int(inside.sum())))
    torch.testing.assert_close(x[:, ~inside], _norm((0.0, 0.0, 0.0))[:, None].expand(3, int((~inside).sum())))


def test_padding_keeps_square_image_of_target_size_and_resize_squashes() -> None:
    img = _noise(16, 16)
    raw = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(preprocess_reference(img, 16), (raw - IMAGENET_M) / IMAGENET_S)
    # resize never pads: a solid rectangle stays solid, no black
    x = preprocess_generated(_solid(40, 20, (0, 255, 0)), 16)
    torch.testing.assert_close(x, _norm((0.0, 1.0, 0.0))[:, None, None].expand(3, 16, 16))
    # left half white / right half black keeps its columns when squashed
    half = Image.fromarray(np.concatenate([np.full((20, 20, 3), 255, np.uint8), np.zeros((20, 20, 3), np.uint8)], 1))
    y = resize_image(half, 16, "resize")
    arr = np.asarray(y)
    assert arr.shape == (16, 16, 3)
    assert (arr[:, :6] == 255).all()
    assert (arr[:, 10:] == 0).all()


def test_resize_rectangle_truncates_like_torchvision_and_converts_to_rgb_after() -> None:
    # torchvision Resize(int): long side int(S·long/short): 16·37/20 = 29.6 → 29 (rounding would give 30)
    assert resize_image(_noise(37, 20), 16, "resize_rectangle").size == (29, 16)
    assert resize_image(_noise(20, 37), 16, "resize_rectangle").size == (16, 29)
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8), mode="L")
    out = resize_image(gray, 16, "padding")
    assert out.mode == "RGB"
    arr = np.asarray(out)
    assert (arr[..., 0] == arr[..., 1]).all()
    assert (arr[..., 1] == arr[..., 2]).all()
    with pytest.raises(InvalidConfigError, match="resize mode 'stretch'"):
        resize_image(gray, 16, "stretch")  # type: ignore[arg-type]


def test_encoders_use_official_sizes_and_constants() -> None:
    dino = load_encoder("dinov2", None, tiny=True, device="cpu")
    clip = load_encoder("clip", None, tiny=True, device="cpu")
    vgg = load_encoder("vgg19", None, tiny=True, device="cpu")
    assert (dino.image_size, vgg.image_size, clip.image_size) == (224, 224, 32)
    assert (dino.mean, dino.std, vgg.mean, vgg.std) == (IMAGENET_MEAN, IMAGENET_STD, IMAGENET_MEAN, IMAGENET_STD)
    assert (clip.mean, clip.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    white = _solid(50, 30, (255, 255, 255))
    torch.testing.assert_close(clip.preprocess_generated(white)[:, 0, 0], _norm((1, 1, 1), OPENAI_CLIP_MEAN,
                                                                                OPENAI_CLIP_STD))
    # generated: squashed; reference: padded (black corner); VGG generated: aspect kept
    assert clip.preprocess_reference(white)[:, 0, 0].tolist() == pytest.approx(
        _norm((0, 0, 0), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).tolist())
    assert vgg.preprocess_generated(white).shape == (3, 224, 373)  # int(224·50/30) = 373
    assert vgg.preprocess_reference(white).shape == (3, 224, 224)
    assert dino.preprocessing() != dino.preprocessing(reference=True)


# ----------------------------------------------------------------------------------------------- DINOv2
def test_dinov2_is_cls_after_final_layernorm(images: list[Image.Image]) -> None:
    enc = load_encoder("dinov2", None, tiny=True, device="cpu", image_size=56)
    feats = enc.image_features(images, batch_size=2)
    assert feats.shape == (3, 32)
    assert feats.dtype == torch.float32
    pixels = torch.stack([enc.preprocess_generated(im) for im in images])
    with torch.no_grad():
        out = enc.model(pixel_values=pixels, output_hidden_states=True)  # type: ignore[operator]
        want = enc.model.layernorm(out.hidden_states[-1])[:, 0]  # type: ignore[union-attr]
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats, out.pooler_output, atol=1e-5, rtol=1e-5)
    # reference images are padded, so their features differ from the squashed ones
    ref = enc.image_features(images, reference=True)
    assert not torch.allclose(ref[:2], feats[:2], atol=1e-3)
    torch.testing.assert_close(ref[2], feats[2])  # a square image: padding only resizes


def test_dinov2_deterministic_and_round_trip(tmp_path: Path, images: list[Image.Image]) -> None:
    a = load_encoder("dinov2", None, tiny=True, device="cpu", image_size=28)
    b = load_encoder("dinov2", None, tiny=True, device="cpu", image_size=28)
    c = load_encoder("dinov2", None, tiny=True, seed=1, device="cpu", image_size=28)
    assert a.identity == b.identity != c.identity
    torch.testing.assert_close(a.image_features(images), b.image_features(images), atol=0, rtol=0)
    folder = write_tiny_encoder("dinov2", tmp_path / "dino")
    loaded = load_encoder("dinov2", folder, device="cpu", image_size=28)
    assert (folder / "config.json").is_file()
    assert loaded.identity.startswith("dinov2:dino:")
    torch.testing.assert_close(loaded.image_features(images), a.image_features(images), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- CLIP
def test_clip_features_equal_clipmodel(images: list[Image.Image]) -> None:
    enc = load_encoder("clip", None, tiny=True, device="cpu")
    assert isinstance(enc, ClipEncoder)
    model = enc.model
    proc = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False, resample=3,
                                 image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img_want = model.get_image_features(pixel_values=pixels).pooler_output  # type: ignore[operator]
    img = enc.image_features(images)
    assert img.shape == (3, 16)
    torch.testing.assert_close(img, img_want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-3)  # projected, not normalised

    texts = ["a photo of sks dog", "a red circle on a white background", "cat"]
    tok = _tiny_tokenizer()
    ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        txt_want = model.get_text_features(input_ids=ids["input_ids"],  # type: ignore[operator]
                                           attention_mask=ids["attention_mask"]).pooler_output
    txt = enc.text_features(texts, batch_size=2)
    assert txt.shape == (3, 16)
    torch.testing.assert_close(txt, txt_want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(txt[0], txt[2])


def test_clip_round_trip_long_text_and_eos_guard(tmp_path: Path, images: list[Image.Image]) -> None:
    tiny = load_encoder("clip", None, tiny=True, device="cpu")
    folder = write_tiny_encoder("clip", tmp_path / "clip")
    loaded = load_encoder("clip", folder, device="cpu")
    assert (loaded.image_size, loaded.mean) == (32, OPENAI_CLIP_MEAN)
    torch.testing.assert_close(loaded.image_features(images), tiny.image_features(images), atol=1e-6, rtol=1e-6)
    long_text = " ".join(["painting"] * 200)  # > 77 tokens: truncated as open_clip does
    torch.testing.assert_close(loaded.text_features(["a cat", long_text]), tiny.text_features(["a cat", long_text]),
                               atol=1e-6, rtol=1e-6)
    assert tiny.text_features([long_text]).isfinite().all()

    from transformers import CLIPConfig, CLIPModel

    bad = CLIPModel(CLIPConfig(text_config={"vocab_size": 714, "hidden_size": 32, "intermediate_size": 37,
                                            "num_hidden_layers": 1, "num_attention_heads": 4},
                               vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                              "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                               projection_dim=16))
    with pytest.raises(InvalidConfigError, match="eos_token_id"):
        ClipEncoder(bad, _tiny_tokenizer(), identity="x", image_size=32, mean=OPENAI_CLIP_MEAN,
                    std=OPENAI_CLIP_STD, device=torch.device("cpu"), autocast=False, source="bad")


def test_clip_checkpoint_file_needs_open_clip(tmp_path: Path) -> None:
    try:
        import open_clip  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        f = tmp_path / "open_clip_model.safetensors"
        f.write_bytes(b"x")
        with pytest.raises(InvalidConfigError, match="open_clip"):
            load_encoder("clip", f, device="cpu")
    else:
        pytest.skip("open_clip installed: the missing-extra error cannot be shown")


# ----------------------------------------------------------------------------------------------- VGG19
def _torchvision_layout_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, (o, c) in TV_VGG19_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(o, c, 3, 3, generator=g) * (2 / (9 * c)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    # classifier entries with torchvision's names (small shapes: they are dropped on load)
    for i in (0, 3, 6):
        sd[f"classifier.{i}.weight"] = torch.randn(8, 8, generator=g)
        sd[f"classifier.{i}.bias"] = torch.randn(8, generator=g)
    return sd


def _reference_taps(sd: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """conv outputs at features 0, 5, 10, 19, 28 computed functionally from the state dict (before ReLU)."""
    taps = []
    for i in range(29):
        if i in TV_VGG19_CONVS:
            x = F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1)
            if i in (0, 5, 10, 19, 28):
                taps.append(x)
        elif i in TV_POOLS:
            x = F.max_pool2d(x, 2, 2)
        else:
            x = F.relu(x)
    return taps


def test_vgg19_torchvision_state_dict_loads_strictly_pre_relu(tmp_path: Path) -> None:
    assert conv_indices() == sorted(TV_VGG19_CONVS)
    sd = _torchvision_layout_dict()
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(sd, path)
    enc = load_encoder("vgg19", path, device="cpu", image_size=32)
    for k, v in enc.model.features.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(v, sd[f"features.{k}"]), k
    img = _noise(48, 32)
    maps = enc.feature_maps([img])
    assert [tuple(m.shape) for m in maps] == [(1, 64, 32, 48), (1, 128, 16, 24), (1, 256, 8, 12), (1, 512, 4, 6),
                                              (1, 512, 2, 3)]
    want = _reference_taps(sd, enc.preprocess_generated(img)[None])
    for m, w in zip(maps, want):
        torch.testing.assert_close(m, w, atol=1e-4, rtol=1e-4)
        assert (m < 0).any()  # before ReLU


def test_vgg19_official_taps_reproduce_inplace_relu_loop() -> None:
    sd = _torchvision_layout_dict(1)
    layers: list[nn.Module] = []
    for i in range(37):
        if i in TV_VGG19_CONVS:
            o, c = TV_VGG19_CONVS[i]
            conv = nn.Conv2d(c, o, 3, padding=1)
            conv.load_state_dict({"weight": sd[f"features.{i}.weight"], "bias": sd[f"features.{i}.bias"]})
            layers.append(conv)
        else:
            layers.append(nn.MaxPool2d(2, 2) if i in TV_POOLS else nn.ReLU(inplace=True))
    seq = nn.Sequential(*layers)[:29]
    x = preprocess_generated(_noise(40, 40), 32)[None]
    official: list[torch.Tensor] = []
    with torch.no_grad():  # the official VGG.forward loop, verbatim in behaviour
        h = x
        for n, layer in enumerate(seq):
            h = layer(h)
            if str(n) in ["0", "5", "10", "19", "28"]:
                official.append(h)
    from lyco_evaluator.encoders.vgg import vgg19_from_state_dict

    quirk = vgg19_from_state_dict(sd, "t", taps="official")
    pre = vgg19_from_state_dict(sd, "t")
    with torch.no_grad():
        got, got_pre = quirk(x), pre(x)
    for k, (a, b) in enumerate(zip(got, official)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert (a >= 0).all() if k < 4 else (a < 0).any()
    torch.testing.assert_close(got_pre[4], got[4])
    assert not torch.allclose(got_pre[0], got[0])


def test_vgg19_bad_state_dicts(tmp_path: Path) -> None:
    sd = _torchvision_layout_dict()
    missing = {k: v for k, v in sd.items() if k != "features.28.weight"}
    torch.save(missing, tmp_path / "m.pth")
    with pytest.raises(CorruptFileError, match=r"features\.28\.weight"):
        load_encoder("vgg19", tmp_path / "m.pth", device="cpu")
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(CorruptFileError, match=r"'extra\.weight'"):
        load_encoder("vgg19", tmp_path / "x.pth", device="cpu")
    wrong = dict(sd)
    wrong["features.2.weight"] = torch.zeros(64, 32, 3, 3)  # does not chain from conv1_1's 64 channels
    torch.save(wrong, tmp_path / "w.pth")
    with pytest.raises(CorruptFileError, match="do not fit"):
        load_encoder("vgg19", tmp_path / "w.pth", device="cpu")


def test_tiny_vgg_same_layout_and_safetensors_round_trip(tmp_path: Path) -> None:
    tiny = load_encoder("vgg19", None, tiny=True, device="cpu", image_size=32)
    f = write_tiny_encoder("vgg19", tmp_path / "vgg_tiny.safetensors")
    loaded = load_encoder("vgg19", f, device="cpu", image_size=32)
    img = [_noise(32, 32, 5), _noise(32, 32, 6)]
    a, b = tiny.feature_maps(img), loaded.feature_maps(img)
    assert [m.shape[2] for m in a] == [32, 16, 8, 4, 2]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    with pytest.raises(InvalidConfigError, match="feature maps"):
        load_encoder("dinov2", None, tiny=True, device="cpu").feature_maps(img)
    with pytest.raises(InvalidConfigError, match="different aspect"):
        tiny.feature_maps([_noise(32, 32), _noise(48, 32)])


# ----------------------------------------------------------------------------------------------- loading errors
def test_load_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "dinov2-large"
    for kind in ("dinov2", "clip", "vgg19"):
        with pytest.raises(NotFoundError) as ei:
            load_encoder(kind, missing, device="cpu")
        assert str(missing) in str(ei.value)
        assert "\n" not in str(ei.value)
    with pytest.raises(InvalidConfigError, match="'resnet'"):
        load_encoder("resnet", None, tiny=True)
    with pytest.raises(InvalidConfigError, match="tiny=True"):
        load_encoder("clip", tmp_path, tiny=True)
    clip_dir = write_tiny_encoder("clip", tmp_path / "clip")
    with pytest.raises(UnknownFormatError, match="not a DINOv2"):
        load_encoder("dinov2", clip_dir, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotFoundError, match=r"config\.json"):
        load_encoder("dinov2", empty, device="cpu")
    (clip_dir / "model.safetensors").unlink()
    with pytest.raises(NotFoundError, match=re.escape(str(clip_dir))):
        load_encoder("clip", clip_dir, device="cpu")


# ----------------------------------------------------------------------------------------------- cache
def test_feature_cache_hits_misses_and_keys(tmp_path: Path) -> None:
    enc = load_encoder("clip", None, tiny=True, device="cpu")
    files = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        _noise(40, 30, i).save(p)
        files.append(p)
    cache = FeatureCache(tmp_path / "cache")
    first = cached_image_features(enc, files, cache, batch_size=2)
    assert (cache.hits, cache.misses) == (0, 3)
    torch.testing.assert_close(first, enc.image_features([Image.open(p) for p in files]))
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3
    assert not list((tmp_path / "cache").rglob("*.tmp"))

    again = FeatureCache(tmp_path / "cache")  # a new process: hits come from disk
    shutil.copy(files[0], tmp_path / "renamed.png")  # same bytes under another name: still a hit
    second = cached_image_features(enc, [*files, tmp_path / "renamed.png"], again)
    assert (again.hits, again.misses) == (4, 0)
    torch.testing.assert_close(second[:3], first, atol=0, rtol=0)
    cached_image_features(enc, files, again, reference=True)  # other preprocessing: misses
    assert again.misses == 3
    _noise(40, 30, 99).save(files[1])  # changed content: a miss
    cached_image_features(enc, files, again)
    assert again.misses == 4

    txt = cached_text_features(enc, ["a cat", "a dog"], again)
    txt2 = cached_text_features(enc, ["a dog", "a cat", "a bird"], again)
    assert again.misses == 4 + 3
    torch.testing.assert_close(txt2[:2], txt.flip(0), atol=0, rtol=0)


def test_feature_cache_list_values_corruption_and_memory_bound(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "c", max_memory_bytes=3 * 64 * 4)
    calls: list[int] = []

    def value(i: int) -> list[torch.Tensor]:
        calls.append(i)
        return [torch.full((8, 8), float(i)), torch.arange(4.0) * i]

    for i in range(6):
        cache.get(("vgg", f"sha256:{i}", "gram"), lambda i=i: value(i))
        assert cache.memory_bytes <= cache.max_memory_bytes
    assert calls == list(range(6))
    got = cache.get(("vgg", "sha256:0", "gram"), lambda: value(-1))  # evicted from memory, read from disk
    assert calls == list(range(6))
    assert isinstance(got, list)
    torch.testing.assert_close(got[1], torch.arange(4.0) * 0)
    path = cache.path_for(("vgg", "sha256:1", "gram"))
    path.write_bytes(b"garbage")
    fresh = FeatureCache(tmp_path / "c")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fresh.get(("vgg", "sha256:1", "gram"), lambda: value(1))
    assert calls[-1] == 1
    assert any("recomputing" in str(x.message) for x in w)
    assert isinstance(out, list)
    assert float(out[0][0, 0]) == 1.0
    assert FeatureCache(tmp_path / "c").lookup(("vgg", "sha256:1", "gram")) is not None  # rewritten


def test_cached_image_values_with_gram_like_compute(tmp_path: Path) -> None:
    enc = load_encoder("vgg19", None, tiny=True, device="cpu", image_size=32)
    paths = []
    for i in range(2):
        p = tmp_path / f"g{i}.png"
        _noise(32, 32, i).save(p)
        paths.append(p)

    def grams(imgs: list[Image.Image]) -> torch.Tensor:
        out = []
        for m in enc.feature_maps(imgs):
            b, c, h, w = m.shape
            f = m.reshape(b, c, h * w)
            out.append((f @ f.transpose(1, 2) / (c * h * w)).flatten(1))
        return torch.cat(out, 1)

    cache = FeatureCache(tmp_path / "c")
    pre = enc.preprocessing() + ":gram"
    a = cached_image_values(cache, paths, identity=enc.identity, preprocessing=pre, compute=grams)
    b = cached_image_values(cache, paths, identity=enc.identity, preprocessing=pre, compute=grams)
    assert a.shape == (2, 4 * 4 + 8 * 8 + 8 * 8 + 16 * 16 + 16 * 16)
    assert (cache.hits, cache.misses) == (2, 2)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_cache_computes_a_repeated_key_once(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    calls: list[list[int]] = []

    def compute(indices: list[int]) -> list[torch.Tensor]:
        calls.append(indices)
        return [torch.randn(4) for _ in indices]  # a second computation would give other numbers

    keys = [("enc", "text:a", "p"), ("enc", "text:b", "p"), ("enc", "text:a", "p")]
    values = cache.get_many(keys, compute)
    assert calls == [[0, 1]]
    assert torch.equal(values[0], values[2])
    assert not torch.equal(values[0], values[1])
