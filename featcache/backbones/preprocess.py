"""Decoding and deterministic preprocessing: raw sample -> uint8 RGB crop.

Normalisation (mean, std) is *not* applied here: batches travel as uint8 (4x less memory traffic
between worker processes) and are normalised inside the batched forward on the device.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

from ..errors import ConfigError

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

#: ImageNet defaults used for a torchvision model without weights (documented in the README).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, centre-crop ``crop`` x ``crop``, then normalise.

    Attached to a backbone (taken from its weights' own transforms) and recorded in the cache.
    ``draft`` lets JPEG decoding use DCT scaling (PIL draft mode) when the image is at least
    twice the size needed; ``exif_transpose`` applies the EXIF orientation tag.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    draft: bool = True
    exif_transpose: bool = True

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"Interpolation must be one of {', '.join(INTERPOLATIONS)}. Got {self.interpolation!r}."
            )
        if self.crop < 1 or self.resize < self.crop:
            raise ConfigError(f"Preprocessing needs 1 <= crop <= resize. Got crop={self.crop}, resize={self.resize}.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean and std need 3 values each, std > 0. Got mean={self.mean}, std={self.std}.")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


class DecodeError(Exception):
    """A sample cannot be turned into an image; the message is recorded as the skip reason."""


def decode(data: bytes | np.ndarray, pp: Preprocess) -> Image.Image:
    """Decode encoded bytes or a uint8 array into an RGB PIL image.

    Palette, grayscale, RGBA, CMYK and 16-bit images are converted to RGB. Raises
    :class:`DecodeError` for empty, truncated, non-image or over-large files.
    """
    if isinstance(data, np.ndarray):
        arr = data
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            img = Image.open(io.BytesIO(data))
            if pp.draft and img.format == "JPEG":
                # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 size while the result stays at
                # least twice as large as the resize target, so the resize still antialiases.
                w, h = img.size
                scale = 2 * pp.resize / min(w, h)
                if scale < 1:
                    img.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
            img.load()
            if pp.exif_transpose:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"image too large (decompression-bomb limit): {e}") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise DecodeError(f"corrupt or truncated image: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _resized(w: int, h: int, resize: int) -> tuple[int, int]:
    # Same arithmetic as torchvision's Resize(int), so features match a torchvision transforms
    # pipeline on PIL images.
    return (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)


def resize_crop(img: Image.Image, pp: Preprocess, size: int | None = None) -> np.ndarray:
    """Resize the shorter side and centre-crop; returns uint8 array of shape (3, crop, crop)."""
    crop = pp.crop if size is None else size
    resize = pp.resize if size is None else round(size * pp.resize / pp.crop)
    w, h = img.size
    nw, nh = _resized(w, h, resize)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), INTERPOLATIONS[pp.interpolation])
    left = int(round((nw - crop) / 2.0))
    top = int(round((nh - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def crop_array(arr: np.ndarray, pp: Preprocess) -> np.ndarray | None:
    """The centre crop of a uint8 (H, W, 3) array that needs no resizing, with one copy; equal to
    ``resize_crop(decode(arr, pp), pp)``. None when the array needs decoding or resizing."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        return None
    h, w = arr.shape[:2]
    if _resized(w, h, pp.resize) != (w, h):
        return None
    left = int(round((w - pp.crop) / 2.0))
    top = int(round((h - pp.crop) / 2.0))
    return np.ascontiguousarray(arr[top:top + pp.crop, left:left + pp.crop].transpose(2, 0, 1))


def load_image(data: bytes | np.ndarray, pp: Preprocess) -> np.ndarray:
    """Decode and preprocess one sample to a uint8 array of shape (3, crop, crop)."""
    return resize_crop(decode(data, pp), pp)


@dataclass(frozen=True)
class Augment:
    """Cached augmentation: ``views`` random-resized crops (+ horizontal flips) per training image.

    Each view is a pure function of the image's content hash, the view index and ``seed``, so
    resumed and incremental runs reproduce the same views.
    """

    views: int = 0
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d


def augmented_views(img: Image.Image, pp: Preprocess, aug: Augment, content_hash: str) -> np.ndarray:
    """``aug.views`` crops of a decoded image, uint8 array of shape (views, 3, crop, crop).

    The crop box follows torchvision's RandomResizedCrop (10 tries, then a centre crop).
    """
    out = np.empty((aug.views, 3, pp.crop, pp.crop), dtype=np.uint8)
    w, h = img.size
    area = w * h
    log_ratio = np.log(aug.ratio)
    for k in range(aug.views):
        rng = np.random.default_rng([aug.seed, int(content_hash[:16], 16), k])
        box = None
        for _ in range(10):
            target = area * rng.uniform(*aug.scale)
            r = float(np.exp(rng.uniform(*log_ratio)))
            cw, ch = int(round(np.sqrt(target * r))), int(round(np.sqrt(target / r)))
            if 0 < cw <= w and 0 < ch <= h:
                left = int(rng.integers(0, w - cw + 1))
                top = int(rng.integers(0, h - ch + 1))
                box = (left, top, left + cw, top + ch)
                break
        if box is None:
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        view = img.resize((pp.crop, pp.crop), INTERPOLATIONS[pp.interpolation], box=box)
        if aug.flip and rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[k] = np.asarray(view, dtype=np.uint8).transpose(2, 0, 1)
    return out


JPEG_MAGIC = b"\xff\xd8\xff"


class Encoded:
    """Undecoded JPEG bytes travelling from a loader worker to :func:`decode_on_device`, with the
    EXIF orientation read from its header (1 when absent or not applied)."""

    __slots__ = ("data", "orientation")

    def __init__(self, data: bytes, orientation: int = 1) -> None:
        self.data = np.frombuffer(data, dtype=np.uint8)
        self.orientation = orientation


def encoded_jpeg(data: bytes, pp: Preprocess) -> Encoded:
    """Wrap JPEG bytes for :func:`decode_on_device`; reads only the header (for the orientation)."""
    orientation = 1
    if pp.exif_transpose:
        try:
            with Image.open(io.BytesIO(data)) as img:
                orientation = int(img.getexif().get(0x0112, 1))
        except Exception:  # unreadable header: the decoder (or PIL after it) reports the file
            orientation = 1
    return Encoded(data, orientation if 1 <= orientation <= 8 else 1)


def _orient(img, orientation: int):
    """Apply an EXIF orientation to a (C, H, W) tensor, as PIL's ``ImageOps.exif_transpose`` does
    (torchvision's CUDA decoder ignores ``apply_exif_orientation``)."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1).flip(-2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


def decode_on_device(items: list, pp: Preprocess, device) -> tuple[list, list[tuple[int, str]]]:
    """Decode a batch's JPEGs with ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on CUDA,
    libjpeg-turbo on the CPU), then resize (antialiased) and centre-crop there.

    ``items`` holds :class:`Encoded` JPEGs and already decoded ``(1, 3, crop, crop)`` uint8 arrays
    (other formats, decoded by PIL in the loader). Returns the crops as ``(3, crop, crop)`` uint8
    tensors on ``device`` (None where a sample failed) and ``[(position, reason)]`` of failures. A
    JPEG the device decoder rejects is tried again with PIL before it is recorded as failed.
    """
    # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still work as pinned.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        return _decode_on_device(items, pp, device)


def _decode_on_device(items: list, pp: Preprocess, device) -> tuple[list, list[tuple[int, str]]]:
    import torch
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode

    out: list = [None] * len(items)
    failed: list[tuple[int, str]] = []
    jpegs = [k for k, it in enumerate(items) if isinstance(it, Encoded)]
    for k, it in enumerate(items):
        if not isinstance(it, Encoded):
            out[k] = torch.from_numpy(np.ascontiguousarray(it[0])).to(device, non_blocking=True)
    decoded: dict[int, object] = {}
    if jpegs:
        data = [torch.from_numpy(items[k].data.copy()) for k in jpegs]
        try:
            imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            decoded = dict(zip(jpegs, imgs))
        except RuntimeError:  # one bad file fails the batch call: decode one by one
            for k, d in zip(jpegs, data):
                try:
                    decoded[k] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass
    for k in jpegs:
        img = decoded.get(k)
        if img is None:  # PIL knows more damaged and exotic JPEGs, and names what is wrong
            try:
                crop = resize_crop(decode(items[k].data.tobytes(), pp), pp)
                out[k] = torch.from_numpy(crop).to(device)
            except DecodeError as e:
                failed.append((k, str(e)))
            continue
        img = _orient(img, items[k].orientation)
        h, w = img.shape[-2:]
        nw, nh = _resized(w, h, pp.resize)
        if (nw, nh) != (w, h):
            img = TF.resize(img, [nh, nw], interpolation=InterpolationMode(pp.interpolation), antialias=True)
        out[k] = TF.center_crop(img, [pp.crop, pp.crop])
    return out, failed
