"""Training curves of a pretraining run, from Lightning's CSV logs (``RUN/logs/version_*/metrics.csv``).

Whatever the columns hold is drawn against the step, one panel per kind: losses (``*loss*``), validation
figures such as the online k-NN accuracy (``val_*``) and learning rates (``lr-*``). Versions (a resumed run
writes another) are read in order and joined.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from marrowlens.artifacts import atomic_path

CURVES_FILE = "training_curves.png"
PANELS = (("loss", "training loss"), ("val_", "validation (online k-NN)"), ("lr-", "learning rate"))


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """Every logged row of the run, versions in order (empty when there are none)."""
    paths = sorted(
        Path(run_dir).glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1] or 0)
    )
    frames = [pd.read_csv(path) for path in paths if path.stat().st_size > 0]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _panel(column: str) -> int | None:
    for i, (marker, _) in enumerate(PANELS):
        if column.startswith(marker) if marker.endswith(("_", "-")) else marker in column:
            return i
    return None


def write_training_curves(run_dir: Path, path: Path) -> Path | str:
    """Draw ``path`` (PNG); the path, or a note on why there is nothing to draw."""
    metrics = read_metrics(run_dir)
    if metrics.empty or "step" not in metrics:
        return f"no training logs under {Path(run_dir) / 'logs'}"
    series: dict[int, list[str]] = {}
    for column in metrics.columns:
        panel = _panel(str(column))
        if panel is not None and metrics[column].notna().any():
            series.setdefault(panel, []).append(str(column))
    if not series:
        return "the training logs hold no loss, validation or learning-rate column"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(series)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for column in series[panel]:
            rows = metrics[["step", column]].dropna()
            ax.plot(rows["step"], rows[column], marker="o" if len(rows) < 30 else None, markersize=3, label=column)
        ax.set_xlabel("step")
        ax.set_title(PANELS[panel][1], fontsize=9)
        ax.legend(fontsize=7)
    epochs = int(metrics["epoch"].max()) + 1 if "epoch" in metrics and metrics["epoch"].notna().any() else 0
    figure.suptitle(f"pretraining: {epochs} epoch(s), {int(metrics['step'].max()) + 1} step(s)", fontsize=10, y=1.04)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)
