"""Safe decoding of cell images, whatever the scanner wrote.

Every image becomes 8-bit RGB: 16-bit and float data are rescaled, greyscale is replicated,
transparency is flattened onto white, palettes and CMYK are converted, EXIF rotation is applied.
Anything that cannot be decoded raises :class:`ImageDecodeError` with a reason short enough for a
quarantine list. Pillow does the decoding; tifffile takes the TIFFs Pillow cannot read (16-bit RGB,
many-channel scanner output).

Size limit: an image whose header declares more than ``MARROWLENS_MAX_PIXELS`` pixels (environment
variable, read at every call; default 64 million), or more than 4 bytes a pixel times that many
(float or many-channel TIFFs), is refused *before* any pixel is decoded, for every format, because
a few hundred KB of compressed TIFF can declare gigabytes of float pixels.
Conversion to 8 bits then works in row chunks, so no wide (float64, int64) copy of a whole image
is ever made.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from marrowlens.errors import MarrowLensError

MIN_SIDE = 8
MAX_PIXELS = 64_000_000  # default of MARROWLENS_MAX_PIXELS
MAX_PIXELS_ENV = "MARROWLENS_MAX_PIXELS"
_BYTES_PER_PIXEL = 4  # decoded bytes a pixel budgeted by the limit (8-bit RGBA)
_CHUNK_ELEMENTS = 1 << 18  # rows converted at a time: ~2 MB of float64 / int64 scratch
_TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}


class ImageDecodeError(MarrowLensError):
    """An image that cannot become an RGB cell picture; the message is the quarantine reason."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str


def max_pixels() -> int:
    """The pixel limit, from ``MARROWLENS_MAX_PIXELS`` if set (read now, so a test or a user can lower it)."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return MAX_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise MarrowLensError(f"{MAX_PIXELS_ENV} must be a positive whole number of pixels, not {value!r}")
    return int(value)


def _check_declared_size(width: int, height: int, pixel_bytes: int = 1) -> None:
    """Refuse an image by the size its header declares, before a byte of it is decoded.

    The limit also budgets 4 bytes a pixel (8-bit RGBA), so wide pixels (float RGB, many channels)
    must be fewer: a 765 KB zlib TIFF of 8000x8000 float32 RGB declares 768 MB.
    """
    limit = max_pixels()
    if width * height > limit:
        raise ImageDecodeError(f"too large ({width}x{height} px, limit {limit} px; see {MAX_PIXELS_ENV})")
    if width * height * pixel_bytes > limit * _BYTES_PER_PIXEL:
        raise ImageDecodeError(
            f"too large ({width}x{height} px of {pixel_bytes} bytes, limit {limit} px of {_BYTES_PER_PIXEL}; "
            f"see {MAX_PIXELS_ENV})"
        )


def _row_chunks(array: npt.NDArray[Any]) -> list[slice]:
    rows = max(1, _CHUNK_ELEMENTS // max(1, array[:1].size))
    return [slice(start, start + rows) for start in range(0, len(array), rows)]


def _rowwise(array: npt.NDArray[Any], convert: Callable[[npt.NDArray[Any]], npt.NDArray[Any]]) -> npt.NDArray[np.uint8]:
    """``convert`` applied chunk by chunk of rows into a uint8 array: scratch copies stay chunk-sized."""
    out = np.empty(array.shape, dtype=np.uint8)
    for rows in _row_chunks(array):
        out[rows] = convert(array[rows])
    return out


def _finite(chunk: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    return np.nan_to_num(chunk.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _to_uint8(array: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Rescale integer data by its bit depth (12-bit in 16-bit containers too), floats by range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        peak = max((float(_finite(array[rows]).max(initial=0.0)) for rows in _row_chunks(array)), default=0.0)
        top = max(1.0, peak)
        return _rowwise(array, lambda chunk: np.clip(_finite(chunk) / top * 255.0, 0, 255))
    low = min(int(array.min(initial=0)), 0)
    peak = int(array.max(initial=0)) - low
    bits = max(8, int(np.ceil(np.log2(peak + 1))) if peak > 0 else 8)
    return _rowwise(array, lambda chunk: ((chunk.astype(np.int64) - low) * 255 // ((1 << bits) - 1)).clip(0, 255))


def _array_to_rgb(array: npt.NDArray[Any]) -> Image.Image:
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
            _check_declared_size(*image.size)
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
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            if not tiff.pages:
                raise ImageDecodeError("truncated or corrupt (no pixel data)")
            page = tiff.pages.first  # a TiffPage (later pages may be TiffFrames, which lack the header fields)
            pixel_bytes = page.samplesperpixel * -(-page.bitspersample // 8)
            _check_declared_size(page.imagewidth, page.imagelength * page.imagedepth, pixel_bytes)
            array = page.asarray()
    except MarrowLensError:  # our own reason (no pages, too large) or a bad MARROWLENS_MAX_PIXELS
        raise
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
