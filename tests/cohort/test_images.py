from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from marrowlens.cohort.images import ImageDecodeError, decode_bytes, load_rgb, pad_to_square
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


def test_pad_to_square_centres_and_keeps_content() -> None:
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    square = pad_to_square(image)
    assert square.size == (40, 40)
    array = np.asarray(square)
    assert array[20, 20].tolist() == [200, 10, 10]
    assert array[0, 0].tolist() == [200, 10, 10]  # border colour fills the pad
