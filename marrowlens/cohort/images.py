"""Safe decoding of cell images, whatever the scanner wrote.

Every image becomes 8-bit RGB: 16-bit and float data are rescaled, greyscale is replicated,
transparency is flattened onto white, palettes and CMYK are converted, EXIF rotation is applied.
Anything that cannot be decoded raises :class:`ImageDecodeError` with a reason short enough for a
quarantine list. Pillow does the decoding; tifffile takes the TIFFs Pillow cannot read (16-bit RGB,
many-channel scanner output).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from marrowlens.errors import MarrowLensError

MIN_SIDE = 8
MAX_PIXELS = 64_000_000
_TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}


class ImageDecodeError(MarrowLensError):
    """An image that cannot become an RGB cell picture; the message is the quarantine reason."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Rescale integer data by its bit depth (12-bit in 16-bit containers too), floats by range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 1.0 if finite.max(initial=0.0) <= 1.0 else float(finite.max())
        return np.clip(finite / top * 255.0, 0, 255).astype(np.uint8)
    values = array.astype(np.int64)
    low = min(int(values.min(initial=0)), 0)
    peak = int(values.max(initial=0)) - low
    bits = max(8, int(np.ceil(np.log2(peak + 1))) if peak > 0 else 8)
    return ((values - low) * 255 // ((1 << bits) - 1)).clip(0, 255).astype(np.uint8)


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    array = np.squeeze(array)
    if array.size == 0:
        raise ImageDecodeError("truncated or corrupt (no pixel data)")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] > 4:
        array = np.moveaxis(array, 0, -1)  # channels-first TIFF
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ImageDecodeError(f"unsupported pixel array of shape {array.shape}")
    if array.shape[-1] > 4:
        array = array[..., :3]  # many-channel scanner output: keep the first three
    array = _to_uint8(array)
    channels = array.shape[-1]
    if channels == 1:
        return Image.fromarray(np.repeat(array, 3, axis=-1))
    if channels == 2:  # grey + alpha
        return _flatten_alpha(Image.fromarray(array, mode="LA"))
    if channels == 4:
        return _flatten_alpha(Image.fromarray(array, mode="RGBA"))
    return Image.fromarray(np.ascontiguousarray(array[..., :3]))


def _flatten_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    if mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    return _array_to_rgb(np.asarray(image))  # I;16*, I, F and other wide modes


def _decode(data: bytes, suffix: str) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
            return _pil_to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"too large to decode safely ({exc})") from exc
        except UnidentifiedImageError as exc:
            if suffix not in _TIFF_SUFFIXES:
                raise ImageDecodeError("not an image (format not recognised)") from exc
            pil_error: Exception = exc
        except (OSError, ValueError, SyntaxError) as exc:
            if suffix not in _TIFF_SUFFIXES:
                raise ImageDecodeError(f"truncated or corrupt ({_first_line(exc)})") from exc
            pil_error = exc
    return _decode_tiff(data, pil_error)


def _decode_tiff(data: bytes, pil_error: Exception) -> Image.Image:
    import tifffile

    try:
        array = tifffile.imread(io.BytesIO(data), key=0)
    except Exception as exc:  # tifffile raises many types for broken files
        raise ImageDecodeError(f"truncated or corrupt TIFF ({_first_line(pil_error)})") from exc
    return _array_to_rgb(np.asarray(array))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB image or raise :class:`ImageDecodeError` with the reason."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageDecodeError("file not found") from exc
    except OSError as exc:
        raise ImageDecodeError(f"unreadable ({exc.strerror or exc})") from exc
    return decode_bytes(data, path.suffix.lower())


def decode_bytes(data: bytes, suffix: str = "") -> Image.Image:
    """Decode image bytes (an upload, a file's content) into RGB, with the same checks as files."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    image = _decode(data, suffix.lower())
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ImageDecodeError(f"too small ({width}x{height} px, need at least {MIN_SIDE})")
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"too large ({width}x{height} px)")
    return image


def inspect_image(path: str | Path) -> ImageInfo:
    """Fully decode ``path`` (so truncation is caught) and report its size."""
    image = load_rgb(path)
    return ImageInfo(width=image.width, height=image.height, mode=image.mode)


def pad_to_square(image: Image.Image) -> Image.Image:
    """Pad the short side with the border's median colour, so resizing never distorts the cell."""
    width, height = image.size
    if width == height:
        return image
    array = np.asarray(image)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square
