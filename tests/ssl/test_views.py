import numpy as np
import pytest
import torch
from PIL import Image

from marrowlens.config import PretrainConfig, load_config
from marrowlens.ssl.methods import METHODS
from marrowlens.ssl.views import CentredResizedCrop, StainJitter


def _marked_image(size: int = 60) -> Image.Image:
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[size // 2 - 2 : size // 2 + 2, size // 2 - 2 : size // 2 + 2] = 255  # the "cell" at the centre
    return Image.fromarray(array)


class TestCentredResizedCrop:
    @pytest.mark.parametrize("scale", [(0.05, 0.2), (0.2, 0.5), (0.4, 1.0)])
    def test_every_crop_keeps_the_centre(self, scale: tuple[float, float]) -> None:
        crop = CentredResizedCrop(16, scale=scale)
        torch.manual_seed(0)
        for _ in range(200):
            assert np.asarray(crop(_marked_image())).max() > 0

    def test_plain_random_crops_would_lose_it(self) -> None:
        from torchvision.transforms import RandomResizedCrop

        crop = RandomResizedCrop(16, scale=(0.05, 0.2))
        torch.manual_seed(0)
        lost = sum(np.asarray(crop(_marked_image())).max() == 0 for _ in range(200))
        assert lost > 50  # the guard above is doing real work


class TestStainJitter:
    def test_changes_colours_not_geometry(self) -> None:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(40, 220, (24, 24, 3), dtype=np.uint8))
        torch.manual_seed(1)
        out = StainJitter(sigma=0.3, prob=1.0)(image)
        assert out.size == image.size and out.mode == "RGB"
        difference = np.abs(np.asarray(out, dtype=int) - np.asarray(image, dtype=int))
        assert 0 < difference.mean() < 60

    def test_off_when_sigma_zero(self) -> None:
        image = Image.new("RGB", (8, 8), (120, 60, 150))
        assert StainJitter(sigma=0.0, prob=1.0)(image) is image


@pytest.mark.parametrize(
    "method, expected",
    [
        ("simclr", [(3, 32, 32)] * 2),
        ("dino", [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3),
        ("byol", [(3, 32, 32)] * 2),
        ("vicreg", [(3, 32, 32)] * 2),
    ],
)
def test_views_per_method(method: str, expected: list[tuple[int, ...]]) -> None:
    config = load_config(
        PretrainConfig,
        None,
        [f"model.method={method}", "model.image_size=32", "dino.local_crop_size=16", "dino.n_local_views=3"],
    )
    views = METHODS[method].build_views(config, (0.5,) * 3, (0.5,) * 3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    out = views(image)
    assert [tuple(v.shape) for v in out] == expected
    torch.manual_seed(3)
    np.random.seed(3)
    first = views(image)
    torch.manual_seed(3)
    np.random.seed(3)
    second = views(image)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
