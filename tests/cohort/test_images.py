import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from marrowlens.cohort.images import ImageDecodeError, decode_bytes, load_rgb, pad_to_square
from marrowlens.errors import MarrowLensError
from tests.conftest import write_cell


class TestLoadRgb:
    @pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "CMYK"])
    def test_pil_modes_become_rgb(self, tmp_path: Path, mode: str) -> None:
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        path = write_cell(tmp_path / f"x.{fmt.lower()}", seed=1, mode=mode, fmt=fmt)
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (32, 32)

    def test_rgba_transparency_is_flattened_on_white(self, tmp_path: Path) -> None:
        array = np.zeros((16, 16, 4), dtype=np.uint8)
        Image.fromarray(array, "RGBA").save(tmp_path / "clear.png")
        assert np.asarray(load_rgb(tmp_path / "clear.png")).min() == 255

    def test_16_bit_grey_png_uses_its_bit_depth(self, tmp_path: Path) -> None:
        array = np.linspace(0, 4095, 32 * 32).reshape(32, 32).astype(np.uint16)  # 12-bit data
        Image.fromarray(array).save(tmp_path / "g16.png")
        image = np.asarray(load_rgb(tmp_path / "g16.png"))
        assert image.shape == (32, 32, 3)
        assert image.max() == 255 and image.min() == 0

    def test_16_bit_rgb_tiff(self, tmp_path: Path) -> None:
        array = np.full((20, 24, 3), 65535, dtype=np.uint16)
        array[..., 1] = 0
        tifffile.imwrite(tmp_path / "rgb16.tif", array)
        image = np.asarray(load_rgb(tmp_path / "rgb16.tif"))
        assert image.shape == (20, 24, 3)
        assert image[0, 0].tolist() == [255, 0, 255]

    def test_channels_first_float_tiff(self, tmp_path: Path) -> None:
        tifffile.imwrite(tmp_path / "f.tif", np.full((3, 16, 16), 0.5, dtype=np.float32))
        image = np.asarray(load_rgb(tmp_path / "f.tif"))
        assert image.shape == (16, 16, 3) and abs(int(image[0, 0, 0]) - 127) <= 1

    def test_zero_byte(self, tmp_path: Path) -> None:
        (tmp_path / "empty.png").write_bytes(b"")
        with pytest.raises(ImageDecodeError, match="empty file"):
            load_rgb(tmp_path / "empty.png")

    def test_truncated(self, tmp_path: Path) -> None:
        path = write_cell(tmp_path / "t.jpg", seed=2, size=64, fmt="JPEG")
        path.write_bytes(path.read_bytes()[:300])
        with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
            load_rgb(path)

    def test_not_an_image(self, tmp_path: Path) -> None:
        (tmp_path / "fake.png").write_text("hello, I am text")
        with pytest.raises(ImageDecodeError, match="not an image"):
            load_rgb(tmp_path / "fake.png")

    def test_broken_tiff(self, tmp_path: Path) -> None:
        (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage-garbage")
        with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
            load_rgb(tmp_path / "bad.tif")

    def test_too_small(self, tmp_path: Path) -> None:
        Image.new("RGB", (3, 40)).save(tmp_path / "sliver.png")
        with pytest.raises(ImageDecodeError, match="too small"):
            load_rgb(tmp_path / "sliver.png")

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ImageDecodeError, match="not found"):
            load_rgb(tmp_path / "nope.png")

    def test_decode_bytes_rejects_garbage(self) -> None:
        with pytest.raises(ImageDecodeError):
            decode_bytes(b"\x89PNG\r\n\x1a\nbroken", ".png")


def tiff_bytes(array: np.ndarray, compression: str | None = "zlib") -> bytes:
    """A TIFF of ``array``; more than 4 trailing channels are written as samples of one page."""
    buffer = io.BytesIO()
    layout = {"photometric": "minisblack", "planarconfig": "contig"} if array.shape[-1] > 4 else {}
    tifffile.imwrite(buffer, array, compression=compression, **layout)
    return buffer.getvalue()


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, decoding pixels with Pillow or tifffile fails the test."""

    def decoded(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", decoded)
    monkeypatch.setattr(tifffile, "imread", decoded)
    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)


class TestSizeLimit:
    """Images are refused by the size their header declares, before decoding (a zlib TIFF is a bomb)."""

    @pytest.fixture(autouse=True)
    def small_limit(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("MARROWLENS_MAX_PIXELS", "100000")

    def test_pillow_image_refused_before_load(self, monkeypatch: pytest.MonkeyPatch) -> None:
        buffer = io.BytesIO()
        Image.new("RGB", (600, 600)).save(buffer, format="PNG")
        forbid_decoding(monkeypatch)
        with pytest.raises(
            ImageDecodeError, match=r"^too large \(600x600 px, limit 100000 px; see MARROWLENS_MAX_PIXELS\)$"
        ):
            decode_bytes(buffer.getvalue(), ".png")

    @pytest.mark.parametrize(
        "shape, dtype, shown",
        [
            ((600, 600, 3), np.float32, "600x600 px"),  # the bomb: ~5 KB of zlib, 4 MB of float32
            ((600, 600), np.float64, "600x600 px"),
            ((300, 300, 5), np.float32, "300x300 px of 20 bytes"),  # 90,000 px, but 20 bytes each
            ((300, 300, 3), np.float32, "300x300 px of 12 bytes"),
            ((600, 600, 4), np.uint16, "600x600 px"),
        ],
    )
    def test_tiff_refused_before_decoding(
        self, monkeypatch: pytest.MonkeyPatch, shape: tuple, dtype: type, shown: str
    ) -> None:
        data = tiff_bytes(np.zeros(shape, dtype=dtype))
        forbid_decoding(monkeypatch)
        with pytest.raises(ImageDecodeError) as refused:
            decode_bytes(data, ".tif")
        assert str(refused.value).startswith(f"too large ({shown}, limit 100000 px") and "\n" not in str(refused.value)
        assert str(refused.value).endswith("; see MARROWLENS_MAX_PIXELS)")

    def test_bomb_in_a_file_is_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "bomb.tif").write_bytes(tiff_bytes(np.zeros((600, 600, 3), dtype=np.float32)))
        forbid_decoding(monkeypatch)
        with pytest.raises(ImageDecodeError, match="too large"):
            load_rgb(tmp_path / "bomb.tif")

    def test_images_within_the_limit_still_decode(self) -> None:
        image = decode_bytes(tiff_bytes(np.full((100, 150, 5), 0.5, dtype=np.float32)), ".tif")  # 300 KB of 400
        assert image.size == (150, 100) and abs(int(np.asarray(image)[0, 0, 0]) - 127) <= 1

    def test_bad_setting_is_a_one_line_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("MARROWLENS_MAX_PIXELS", "lots")
        with pytest.raises(MarrowLensError, match="MARROWLENS_MAX_PIXELS must be a positive whole number"):
            decode_bytes(tiff_bytes(np.zeros((16, 16, 3), dtype=np.float32)), ".tif")  # tifffile's path


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_conversion_makes_no_wide_copy_of_the_image(dtype: type) -> None:
    """8-bit conversion works in row chunks: peak memory stays near the decoded array's own size."""
    array = (np.random.default_rng(0).random((1000, 1000, 5)) * (4095 if dtype == np.uint16 else 1)).astype(dtype)
    data = tiff_bytes(array, compression=None)  # 5 channels: Pillow cannot read it, tifffile decodes it
    tracemalloc.start()
    try:
        image = decode_bytes(data, ".tif")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.size == (1000, 1000)
    assert peak < 2 * array.nbytes, f"peak {peak / 2**20:.0f} MiB for a {array.nbytes / 2**20:.0f} MiB image"


def test_pad_to_square_centres_and_keeps_content() -> None:
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    square = pad_to_square(image)
    assert square.size == (40, 40)
    array = np.asarray(square)
    assert array[20, 20].tolist() == [200, 10, 10]
    assert array[0, 0].tolist() == [200, 10, 10]  # border colour fills the pad
