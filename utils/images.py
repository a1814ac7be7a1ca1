"""Image files: reading any of them as RGB float, writing PNG atomically, the one square resize.

Every image enters the project through ``read_image``/``read_pair`` as (3,H,W) float32 in
[0,1] (grey, RGBA, palette and 16-bit files converted) and leaves through ``save_image``.
A ``StackedHalf`` names one half of a side-by-side pair image (raw DID / Rain800).

Backends: PNG files are decoded and encoded with OpenCV, which is faster than Pillow and
lossless, so the pixels are the same (16-bit RGB keeps its 16 bits; Pillow kept 8). Pillow
decodes everything else, and is kept for JPEG on purpose: OpenCV decodes a truncated JPEG
silently (grey fill) instead of failing, and converts CMYK JPEGs one grey level differently.
``PNG_BACKEND`` ("opencv" or "pillow") switches PNG decoding, for the benchmark.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from utils.errors import DataError
from utils.io import atomic_write

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImageError", "is_image", "list_images", "number_key", "StackedHalf",
           "split_stacked", "decode_native", "to_float_rgb", "decode_float", "read_image", "read_pair", "read_rgb8",
           "write_array", "save_image", "resize_square", "resize_to_fit"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PNG_BACKEND = "opencv"
_PNG_COMPRESSION = 6  # Pillow's default level, so written PNGs stay as small as before


class UnreadableImageError(DataError):
    """An image file that cannot be decoded (corrupt, truncated, not an image); ``.path`` names it."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def is_image(name: str) -> bool:
    """True for a visible file name with an image extension."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str) -> list[str]:
    """Image file names directly in ``folder``, sorted."""
    return sorted(f for f in os.listdir(folder) if is_image(f))


def number_key(name: str) -> tuple:
    """Sort key putting ``2.jpg`` before ``10.jpg`` (numeric stems first, then by name)."""
    stem = os.path.splitext(name)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


class StackedHalf(str):
    """Path of a side-by-side stacked pair image, plus which half (``"left"``/``"right"``) to read.

    A ``str`` so that pair lists keep holding paths (``os.path.basename`` etc. work);
    ``read_image`` returns only the named half.
    """
    half: str

    def __new__(cls, path: str, half: str):
        if half not in ("left", "right"):
            raise ValueError(f"half must be 'left' or 'right', got {half!r}")
        obj = super().__new__(cls, path)
        obj.half = half
        return obj

    def __reduce__(self):  # DataLoader workers pickle the pair list
        return StackedHalf, (str(self), self.half)

    def __repr__(self) -> str:
        return f"StackedHalf({str(self)!r}, {self.half!r})"


def split_stacked(img: Tensor, path: str = "image") -> tuple[Tensor, Tensor]:
    """(3,H,2W) side-by-side pair -> (left (3,H,W), right (3,H,W))."""
    w = img.shape[-1]
    if w % 2:
        raise DataError(f"{path} is not a side-by-side pair: its width {w} is odd")
    return img[..., : w // 2], img[..., w // 2:]


# --------------------------------------------------------------------------- decoding
def _decode_png_opencv(path: str) -> Optional[tuple[np.ndarray, str]]:
    """A PNG as ``decode_native`` returns it, via OpenCV; None when OpenCV cannot read it."""
    arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if arr is None:  # missing or corrupt: Pillow then says why, in the usual one line
        return None
    depth = ";16" if arr.dtype == np.uint16 else ""
    if arr.ndim == 2:
        return arr, "I;16" if depth else "L"
    if arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB), "RGB" + depth
    return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA), "RGBA" + depth  # also grey + alpha and palettes with alpha


def decode_native(path: str) -> tuple[np.ndarray, str]:
    """Decode an image file: ((H,W) or (H,W,C) array in the file's own dtype, uint8 for 8-bit
    images; a PIL-style mode). What ``MixedRainDataset.cache_images`` keeps."""
    if PNG_BACKEND == "opencv" and str(path).lower().endswith(".png"):
        decoded = _decode_png_opencv(str(path))
        if decoded is not None:
            return decoded
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):  # palette / other colour spaces
                img = img.convert("RGB")
            return np.asarray(img), img.mode
    except Exception as exc:  # missing, truncated, corrupt, not an image
        raise UnreadableImageError(f"cannot read image {path} ({type(exc).__name__}: {exc})", str(path)) from None


def to_float_rgb(arr: np.ndarray, mode: str) -> np.ndarray:
    """A ``decode_native`` result as float32 (H,W,3) in [0,1] (grey, RGBA and 16-bit converted)."""
    if mode.startswith("I;16") or arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    elif arr.dtype == bool:
        arr = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer) and mode in ("I", "I;32"):
        arr = arr.astype(np.float32) / float(arr.max() or 1)
    else:
        arr = arr.astype(np.float32) / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] == 4:  # RGBA: drop alpha (published data sets never use it)
        arr = arr[..., :3]
    elif arr.shape[2] == 2:  # grey + alpha
        arr = np.repeat(arr[..., :1], 3, axis=2)
    return arr


def decode_float(path: str) -> np.ndarray:
    """Any image file as float32 (H,W,3) in [0,1] (grey, RGBA and 16-bit converted)."""
    return to_float_rgb(*decode_native(path))


def _chw(arr: np.ndarray) -> Tensor:
    """float32 (H,W,3) -> (3,H,W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def read_image(path: Union[str, StackedHalf], decode: Optional[Callable[[str], np.ndarray]] = None) -> Tensor:
    """Read an image file as RGB float (3,H,W) in [0,1] (grey, RGBA and 16-bit converted).

    A ``StackedHalf`` path returns only its half of the side-by-side image. ``decode`` maps a
    file path to float32 (H,W,3) in [0,1] (the training set passes its image cache).
    """
    img = _chw((decode or decode_float)(str(path)))
    if isinstance(path, StackedHalf):
        left, right = split_stacked(img, str(path))
        img = (left if path.half == "left" else right).contiguous()
    return img


def read_pair(rain_path: str, clean_path: str,
              decode: Optional[Callable[[str], np.ndarray]] = None) -> tuple[Tensor, Tensor]:
    """(rain (3,H,W), clean (3,H,W)) in [0,1]; a stacked image is decoded once for both halves.

    Raises ``UnreadableImageError`` for a file that cannot be decoded and ``DataError`` when
    the two sizes differ. ``decode`` as in ``read_image``.
    """
    if isinstance(rain_path, StackedHalf) and isinstance(clean_path, StackedHalf) and str(rain_path) == str(clean_path):
        left, right = split_stacked(_chw((decode or decode_float)(str(rain_path))), str(rain_path))
        halves = {"left": left.contiguous(), "right": right.contiguous()}
        rain, clean = halves[rain_path.half], halves[clean_path.half]
    else:
        rain, clean = read_image(rain_path, decode), read_image(clean_path, decode)
    if rain.shape != clean.shape:
        raise DataError(f"pair sizes differ: {rain_path} is {tuple(rain.shape[1:])}, "
                        f"{clean_path} is {tuple(clean.shape[1:])}")
    return rain, clean


def read_rgb8(path: str) -> np.ndarray:
    """An image file as uint8 (H,W,3), whatever its mode (``prepare`` splits and compares these)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise UnreadableImageError(f"cannot read image {path} ({type(exc).__name__}: {exc})", path) from None


# --------------------------------------------------------------------------- writing, resizing
def _write_png_opencv(arr: np.ndarray, tmp: str) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr,
                            [cv2.IMWRITE_PNG_COMPRESSION, _PNG_COMPRESSION])
    if not ok:
        raise OSError(f"OpenCV could not encode {tmp} as PNG")
    with open(tmp, "wb") as f:
        f.write(data.tobytes())


def write_array(arr: np.ndarray, path: str) -> None:
    """Write a uint8 (H,W,3) array as an image file (format from the extension), atomically."""
    if str(path).lower().endswith(".png"):
        atomic_write(path, lambda tmp: _write_png_opencv(arr, tmp))
    else:  # the temporary name keeps the extension, so Pillow picks the format
        atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp))


def save_image(img: Tensor, path: str) -> None:
    """Write (3,H,W) in [0,1] as an 8-bit PNG/JPEG (rounded), atomically."""
    write_array(img.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy(), path)


def resize_square(x: Tensor, size: int) -> Tensor:
    """(3,H,W) or (B,3,H,W) -> (..., 3, size, size), bilinear with antialiasing (torchvision's Resize on
    tensors), clamped to [0,1]: what training, ``image_code`` and the analysis tools all resize with."""
    return _resize(x, size, size)


def resize_to_fit(x: Tensor, max_side: int) -> Tensor:
    """(3,H,W) or (B,3,H,W) shrunk, aspect kept, so that its longer side is ``max_side`` (previews);
    returned as it is when already that small. Same filter as ``resize_square``."""
    h, w = x.shape[-2:]
    if max(h, w) <= max_side:
        return x
    scale = max_side / max(h, w)
    return _resize(x, max(1, round(h * scale)), max(1, round(w * scale)))


def _resize(x: Tensor, height: int, width: int) -> Tensor:
    batch = x if x.dim() == 4 else x[None]
    out = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
    return out if x.dim() == 4 else out[0]
