"""Image files: reading any of them as RGB float, writing PNG atomically, the one square resize.

Every image enters the project through ``decode_native`` (``read_image``/``read_pair`` as (3,H,W)
float32 in [0,1], grey, RGBA, palette and 16-bit files converted) and leaves through ``save_image``.
The reader takes the size from the file's header first (``read_header``: PNG's IHDR, JPEG's frame
header, Pillow's lazy open for the rest) and refuses, before any pixel is decoded, an image larger
than its decoder reads or than the memory it may take (``check_header``). Every refusal, of the
header check or of the decoder, is an ``UnreadableImageError`` naming the file, which callers
list or skip (test_model, training, ``datasets.py check``) instead of stopping.
A ``StackedHalf`` names one half of a side-by-side pair image (raw DID / Rain800).

Backends: PNG files are decoded and encoded with OpenCV, which is faster than Pillow and
lossless, so the pixels are the same (16-bit RGB keeps its 16 bits; Pillow kept 8). Pillow
decodes everything else, and is kept for JPEG on purpose: OpenCV decodes a truncated JPEG
silently (grey fill) instead of failing, and converts CMYK JPEGs one grey level differently.
``PNG_BACKEND`` ("opencv" or "pillow") switches PNG decoding, for the benchmark.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from utils.errors import DataError
from utils.host import available_memory
from utils.io import atomic_write

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImageError", "is_image", "list_images", "number_key", "StackedHalf",
           "split_stacked", "ImageHeader", "read_header", "check_header", "decode_native", "to_float_rgb", "decode_float", "read_image", "read_pair", "read_rgb8",
           "write_array", "save_image", "resize_square", "resize_to_fit"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PNG_BACKEND = "opencv"
_PNG_COMPRESSION = 6  # Pillow's default level, so written PNGs stay as small as before
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}  # IHDR colour type -> decoded channels (a palette: RGB(A))
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0-SOF15 (not DHT, JPG, DAC)
_FLOAT_RGB_BYTES = 12  # per pixel of the float32 RGB copy every reader but ``read_rgb8`` makes
_ASK_MEMORY_ABOVE = 256 * 2 ** 20  # decoded bytes under which the available memory is not read


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


# --------------------------------------------------------------------------- size before pixels
@dataclass(frozen=True)
class ImageHeader:
    """What a file's header claims: its size, the channels and bytes per sample it decodes to."""
    width: int
    height: int
    channels: int
    sample_bytes: int
    format: str  # "PNG", "JPEG", or Pillow's name of the format

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def native_bytes(self) -> int:
        """Bytes of the decoded array as ``decode_native`` returns it."""
        return self.pixels * self.channels * self.sample_bytes

    @property
    def decoded_bytes(self) -> int:
        """Bytes reading the image holds at once: the decoded array and its float32 RGB copy."""
        return self.native_bytes + self.pixels * _FLOAT_RGB_BYTES


def _png_header(head: bytes) -> ImageHeader:
    # The signature, then IHDR, which the PNG standard requires to be the first chunk.
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise ValueError("a PNG signature without an IHDR chunk after it")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise ValueError(f"PNG colour type {colour} at bit depth {depth} is not a valid combination")
    return ImageHeader(width, height, _PNG_CHANNELS[colour], 2 if depth == 16 else 1, "PNG")


def _jpeg_header(f) -> Optional[ImageHeader]:
    """The frame header (SOF) of a JPEG file; None when there is none before the scan (Pillow decides)."""
    f.seek(2)
    while True:
        byte = f.read(1)
        if not byte:
            return None
        if byte != b"\xff":  # junk between segments, which decoders skip
            continue
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers without a length
            continue
        if code in (0xD9, 0xDA):  # end of image, start of scan: no frame header before the pixels
            return None
        length = f.read(2)
        if len(length) < 2:
            return None
        if code in _JPEG_FRAMES:
            frame = f.read(6)
            if len(frame) < 6:
                return None
            _, height, width, components = struct.unpack(">BHHB", frame)
            return ImageHeader(width, height, 3 if components >= 3 else components, 1, "JPEG")
        f.seek(struct.unpack(">H", length)[0] - 2, os.SEEK_CUR)


def _pillow_header(path: str) -> ImageHeader:
    with Image.open(path) as img:  # lazy: reads the header only
        (width, height), mode, bands = img.size, img.mode, len(img.getbands())
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):  # decoded as RGB
        bands = 3
    return ImageHeader(width, height, bands, 2 if "16" in mode else 4 if mode in ("I", "F", "I;32") else 1,
                       img.format or "image")


def _unreadable(path: str, exc: BaseException) -> UnreadableImageError:
    return UnreadableImageError(f"cannot read image {path} ({type(exc).__name__}: {exc})", str(path))


def read_header(path: str) -> ImageHeader:
    """The size and sample layout ``path`` claims, from its header only (no pixel is decoded).

    The format comes from the file's first bytes, not its extension. Raises
    ``UnreadableImageError`` for a file that is missing or not an image.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(33)
            if head.startswith(_PNG_SIGNATURE):
                header = _png_header(head)
            else:
                header = _jpeg_header(f) if head.startswith(b"\xff\xd8") else None
                if header is None:
                    header = _pillow_header(path)
    except Exception as exc:  # missing, not an image, a header Pillow refuses (its own pixel limit)
        raise _unreadable(path, exc) from None
    if header.width < 1 or header.height < 1:
        raise UnreadableImageError(f"cannot read image {path}: its header claims a {header.width}x{header.height} "
                                   "size", str(path))
    return header


def _decoder_limit(header: ImageHeader) -> tuple[Optional[int], str]:
    """The most pixels the decoder ``decode_native`` uses for this file accepts, and its name."""
    if header.format == "PNG" and PNG_BACKEND == "opencv":
        return int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30)), "OpenCV"
    limit = Image.MAX_IMAGE_PIXELS  # Pillow warns above it and refuses above twice it
    return (None if limit is None else 2 * int(limit)), "Pillow"


def check_header(path: str, max_memory: Optional[int] = None) -> ImageHeader:
    """``read_header``, refusing an image its decoder would refuse or that would not fit in memory.

    ``max_memory``: bytes the decoded image may take (``test_model.py --max_memory``); None: the
    memory the host has available. Raises ``UnreadableImageError``, one line naming the file and
    the size it claims.
    """
    header = read_header(path)
    limit, decoder = _decoder_limit(header)
    claim = f"cannot read image {path}: it claims {header.width}x{header.height} pixels"
    if limit is not None and header.pixels > limit:
        raise UnreadableImageError(f"{claim}, more than {decoder} decodes ({limit / 1e6:.0f} megapixels); "
                                   "shrink the image", str(path))
    need = header.decoded_bytes
    if max_memory is not None:
        if need > max_memory:
            raise UnreadableImageError(f"{claim}; reading it takes about {need / 2 ** 30:.1f} GiB, more than "
                                       f"--max_memory {max_memory / 2 ** 30:.1f} GiB; raise --max_memory or "
                                       "shrink the image", str(path))
    elif need > _ASK_MEMORY_ABOVE:
        available = available_memory()
        if available is not None and need > available:
            raise UnreadableImageError(f"{claim}; reading it takes about {need / 2 ** 30:.1f} GiB, more than the "
                                       f"{available / 2 ** 30:.1f} GiB of memory available; shrink the image",
                                       str(path))
    return header


# --------------------------------------------------------------------------- decoding
def _decode_png_opencv(path: str) -> Optional[tuple[np.ndarray, str]]:
    """A PNG as ``decode_native`` returns it, via OpenCV; None when OpenCV cannot read it."""
    try:
        arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    except cv2.error:  # a limit of its own (a side over 2^20 pixels): Pillow may still read it
        return None
    if arr is None:  # missing or corrupt: Pillow then says why, in the usual one line
        return None
    depth = ";16" if arr.dtype == np.uint16 else ""
    if arr.ndim == 2:
        return arr, "I;16" if depth else "L"
    if arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB), "RGB" + depth
    return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA), "RGBA" + depth  # also grey + alpha and palettes with alpha


def _decode_pillow(path: str) -> tuple[np.ndarray, str]:
    with Image.open(path) as img:
        img.load()
        if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):  # palette / other colour spaces
            img = img.convert("RGB")
        return np.asarray(img), img.mode


def decode_native(path: str, max_memory: Optional[int] = None) -> tuple[np.ndarray, str]:
    """Decode an image file: ((H,W) or (H,W,C) array in the file's own dtype, uint8 for 8-bit
    images; a PIL-style mode). What ``MixedRainDataset.cache_images`` keeps.

    The one reader: the header is checked first (``check_header``, ``max_memory`` as there), and
    every refusal (too large, not an image, truncated, an unsupported format or channel count)
    raises ``UnreadableImageError`` naming the file.
    """
    path = str(path)
    header = check_header(path, max_memory)
    try:
        decoded = _decode_png_opencv(path) if header.format == "PNG" and PNG_BACKEND == "opencv" else None
        arr, mode = decoded if decoded is not None else _decode_pillow(path)
    except Exception as exc:  # truncated, corrupt, a format or mode the decoder does not support
        raise _unreadable(path, exc) from None
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and not 1 <= arr.shape[2] <= 4):
        raise UnreadableImageError(f"cannot read image {path}: it has {arr.shape[2] if arr.ndim == 3 else 'no'} "
                                   "colour channels; grey, grey + alpha, RGB and RGBA images are read", path)
    return arr, mode


def to_float_rgb(arr: np.ndarray, mode: str) -> np.ndarray:
    """A ``decode_native`` result as float32 (H,W,3) in [0,1] (grey, RGBA and 16-bit converted)."""
    # One float array, divided in place: the peak ``ImageHeader.decoded_bytes`` counts.
    if mode.startswith("I;16") or arr.dtype == np.uint16:
        scale = 65535.0
    elif arr.dtype == bool:
        scale = 1.0
    elif np.issubdtype(arr.dtype, np.integer) and mode in ("I", "I;32"):
        scale = float(arr.max() or 1)
    else:
        scale = 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] <= 2:  # grey, grey + alpha
        arr = np.repeat(arr[..., :1], 3, axis=2).astype(np.float32, copy=False)
    else:  # RGB, RGBA: drop alpha (published data sets never use it)
        arr = arr[..., :3].astype(np.float32)
    if scale != 1.0:
        arr /= scale
    return arr


def decode_float(path: str, max_memory: Optional[int] = None) -> np.ndarray:
    """Any image file as float32 (H,W,3) in [0,1] (grey, RGBA and 16-bit converted); ``max_memory``
    as in ``check_header``."""
    return to_float_rgb(*decode_native(path, max_memory))


def _chw(arr: np.ndarray) -> Tensor:
    """float32 (H,W,3) -> (3,H,W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def read_image(path: Union[str, StackedHalf], decode: Optional[Callable[[str], np.ndarray]] = None,
               max_memory: Optional[int] = None) -> Tensor:
    """Read an image file as RGB float (3,H,W) in [0,1] (grey, RGBA and 16-bit converted).

    A ``StackedHalf`` path returns only its half of the side-by-side image. ``decode`` maps a
    file path to float32 (H,W,3) in [0,1] (the training set passes its image cache; it reads
    through ``decode_float`` too). ``max_memory``: bytes the image may take (``check_header``).
    Raises ``UnreadableImageError`` naming the file for anything that cannot be read.
    """
    img = _chw(decode(str(path)) if decode is not None else decode_float(str(path), max_memory))
    if isinstance(path, StackedHalf):
        left, right = split_stacked(img, str(path))
        img = (left if path.half == "left" else right).contiguous()
    return img


def read_pair(rain_path: str, clean_path: str, decode: Optional[Callable[[str], np.ndarray]] = None,
              max_memory: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(rain (3,H,W), clean (3,H,W)) in [0,1]; a stacked image is decoded once for both halves.

    Raises ``UnreadableImageError`` for a file that cannot be decoded and ``DataError`` when
    the two sizes differ. ``decode`` and ``max_memory`` as in ``read_image``.
    """
    if isinstance(rain_path, StackedHalf) and isinstance(clean_path, StackedHalf) and str(rain_path) == str(clean_path):
        arr = decode(str(rain_path)) if decode is not None else decode_float(str(rain_path), max_memory)
        left, right = split_stacked(_chw(arr), str(rain_path))
        halves = {"left": left.contiguous(), "right": right.contiguous()}
        rain, clean = halves[rain_path.half], halves[clean_path.half]
    else:
        rain, clean = read_image(rain_path, decode, max_memory), read_image(clean_path, decode, max_memory)
    if rain.shape != clean.shape:
        raise DataError(f"pair sizes differ: {rain_path} is {tuple(rain.shape[1:])}, "
                        f"{clean_path} is {tuple(clean.shape[1:])}")
    return rain, clean


def read_rgb8(path: str) -> np.ndarray:
    """An image file as uint8 (H,W,3), whatever its mode (``prepare`` splits and compares these).

    Checked as ``decode_native`` checks (``check_header``), then converted by Pillow.
    """
    check_header(path)
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise _unreadable(path, exc) from None


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
