import numpy as np
from PIL import Image

from marrowlens.cohort.stain import ReinhardNormalize, ReinhardTarget, fit_reinhard
from marrowlens.cohort.synthetic import make_synthetic_cohort


def _tinted(image: Image.Image, gain: tuple[float, float, float]) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image, dtype=float) * gain, 0, 255).astype(np.uint8))


def test_reinhard_brings_differently_stained_copies_together(tmp_path) -> None:
    cohort = make_synthetic_cohort(tmp_path / "c", patients=5, cells_per_patient=2, image_size=48, seed=1)
    cell = Image.open(cohort.image_path(cohort.cells["path"].iloc[0])).convert("RGB")
    pink, blue = _tinted(cell, (1.0, 0.8, 0.9)), _tinted(cell, (0.8, 0.9, 1.0))
    target = fit_reinhard([cell])
    normalize = ReinhardNormalize(target)
    before = np.abs(np.asarray(pink, float) - np.asarray(blue, float)).mean()
    after = np.abs(np.asarray(normalize(pink), float) - np.asarray(normalize(blue), float)).mean()
    assert after < before / 3
    assert (
        np.abs(np.asarray(normalize(cell), float) - np.asarray(cell, float)).mean() < 3
    )  # a no-op on the target itself


def test_target_round_trips_through_meta() -> None:
    target = ReinhardTarget((70.0, 5.0, -3.0), (10.0, 4.0, 6.0))
    assert ReinhardTarget.from_dict(target.to_dict()) == target
    assert ReinhardTarget.from_dict(None) is None
