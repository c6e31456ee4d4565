"""Cell-centred crops: the white cell is found, squared with a margin, and used everywhere a cell is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from marrowlens.cohort.crop import FALLBACK, MARGIN, CellCrop, centre_box, centred_on, cut, find_cell
from marrowlens.config import PretrainConfig, load_config
from marrowlens.contracts import Preprocessing
from marrowlens.ssl import train
from marrowlens.ssl.preprocessing import crop_counts, eval_transform
from tests.conftest import REPO_ROOT
from tests.ssl.conftest import TINY


def smear(centre: tuple[int, int] = (110, 96), radius: int = 30, size: int = 240) -> Image.Image:
    """A pink background with red cells, and one purple white cell near the middle."""
    image = Image.new("RGB", (size, size), (238, 214, 206))
    draw = ImageDraw.Draw(image)
    for x, y in [(30, 30), (200, 40), (40, 200), (210, 205), (180, 120), (60, 120)]:
        draw.ellipse((x - 22, y - 22, x + 22, y + 22), fill=(214, 140, 150))
    x, y = centre
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(105, 60, 150))
    return image


def test_the_white_cell_is_found_and_squared_with_its_margin() -> None:
    box = find_cell(smear())
    assert box is not None
    assert abs(box.left + box.side / 2 - 110) <= 3 and abs(box.top + box.side / 2 - 96) <= 3
    assert box.side == pytest.approx(61 * (1 + 2 * MARGIN), abs=6)


def test_no_cell_falls_back_to_a_centre_crop_and_is_counted() -> None:
    crop = CellCrop()
    blank = Image.new("RGB", (100, 80), (238, 214, 206))
    assert find_cell(blank) is None
    out = crop(blank)
    assert out.size == (48, 48) and centre_box(blank).side == 48
    crop(smear())
    assert crop.counts == (1, 1)


def test_centred_crops_keep_the_cell_size_and_follow_the_cell() -> None:
    """``centred``: the same fixed side for a small and a large cell, so the large one stays larger."""
    crop = CellCrop(keep_size=True)
    small, large = smear(radius=15), smear(radius=45)
    side = round(FALLBACK * 240)
    assert crop(small).size == crop(large).size == (side, side)

    def purple_fraction(image: Image.Image) -> float:
        array = np.asarray(image).astype(int)
        return float(((array[..., 2] > array[..., 0]) & (array[..., 1] < 100)).mean())

    assert purple_fraction(crop(large)) > 4 * purple_fraction(crop(small))
    fitted = CellCrop()
    assert purple_fraction(fitted(large)) == pytest.approx(purple_fraction(fitted(small)), rel=0.25)
    box = find_cell(smear(centre=(150, 90)))
    assert box is not None
    moved = centred_on(box, smear())
    assert abs(moved.left + moved.side / 2 - 150) <= 3 and abs(moved.top + moved.side / 2 - 90) <= 3
    assert crop.counts == (4, 0)


def test_a_box_past_the_edge_is_filled_with_the_border_colour() -> None:
    image = smear(centre=(70, 120), radius=50)
    box = find_cell(image)
    assert box is not None and box.left < 0
    square = cut(image, box)
    assert square.size == (box.side, box.side)
    assert np.asarray(square)[box.side // 2, 0].tolist() == [238, 214, 206]


def test_the_eval_transform_crops_when_the_record_says_so() -> None:
    record = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop="cell")
    transform = eval_transform(record)
    assert crop_counts(transform) == (0, 0)
    tensor = transform(smear())
    assert tuple(tensor.shape) == (3, 32, 32) and crop_counts(transform) == (1, 0)
    full = eval_transform(record.model_copy(update={"crop": "full"}))
    assert crop_counts(full) is None and not np.allclose(full(smear()).numpy(), tensor.numpy())


def test_old_records_read_as_full_frame() -> None:
    assert Preprocessing.model_validate({"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}).crop == "full"


@pytest.mark.parametrize("kind", ["cell", "centred"])
def test_pretrain_and_embed_with_cell_crops(cli, labelled_cohort: Path, tmp_path: Path, kind: str) -> None:
    config = load_config(
        PretrainConfig,
        REPO_ROOT / "configs/pretrain/tiny_cpu.yaml",
        [*TINY, "model.backbone=test_resnet", "trainer.max_epochs=1", f"data.crop={kind}"],
    )
    run = tmp_path / "run"
    train.pretrain(config, labelled_cohort, run)
    assert json.loads((run / "backbone.json").read_text())["preprocessing"]["crop"] == kind
    code, output = cli(
        "embed", "--model", run, "--cohort", labelled_cohort, "--out", tmp_path / "emb", "--num-workers", "0",
        "--accelerator", "cpu",
    )  # fmt: skip
    assert code == 0, output
    meta = json.loads((tmp_path / "emb" / "meta.json").read_text())
    counts = meta["preprocessing"]["cell_crop"]
    assert meta["preprocessing"]["crop"] == kind and counts["found"] + counts["centre_crop"] == 32
    assert "cell crop: cell found in" in output
    code, output = cli(
        "embed", "--model", run, "--cohort", labelled_cohort, "--out", tmp_path / "e2", "--crop", "full",
    )  # fmt: skip
    assert code == 2 and "drop --crop full" in output
