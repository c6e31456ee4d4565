"""Probe heads on frozen embeddings, as scikit-learn classifiers (``clone``, ``cross_val_predict`` work).

- :class:`LogisticProbe`: scikit-learn's lbfgs ``LogisticRegression`` on standardised features, C chosen
  by ``LogisticRegressionCV`` on patient-grouped inner folds, scored by balanced accuracy (the metric the
  reports give). A config's ``head: linear`` trains this one for plain cross-entropy without a hidden
  layer or balanced sampling when ``linear.solver`` is ``sklearn`` (:meth:`Head.resolve`).
- :class:`LinearProbe`: a torch linear head (or one hidden layer) on standardised features. Every
  L2 weight decay of the grid trains *at once* as one batched model (each mini-batch is read once
  and multiplied by all heads), each with its own early stopping on a patient-grouped validation
  split; the best by validation loss wins and is retrained on all cells for its epoch count.
  Adam on mini-batches rather than full-batch L-BFGS: GCE/SCE and the hidden layer are not
  convex, balanced sampling needs mini-batches, and early stopping needs epochs; with 1024-cell
  batches 100k x 512 fits in seconds on 2 cores.
- :class:`KNNProbe`: DINO's weighted k-NN (k=20, T=0.07) on a faiss ``IndexFlatIP`` over
  L2-normalised copies (cosine similarity); each of the k neighbours votes ``exp(sim / T)`` for
  its class, optionally times a class weight.

All are :class:`Head` subclasses registered in ``HEADS`` (name -> class, from the table
``config.HEAD_CLASSES``): each builds its parameters from a probe config and saves and rebuilds
itself, so a new head (an attention-MIL head, say) is its own module plus one line in that table.

Features may be memory maps: they are read in blocks, and only the rows a head needs are copied.
The linear head runs torch on ``n_threads`` threads (1 by default): its mini-batch operations are
too small to gain from intra-op parallelism (100k x 512: the same time with 1 or 2 threads), and
one thread stays fast when the other cores are busy.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeAlias

import faiss
import numpy as np
import torch
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from marrowlens.config import HEAD_CLASSES, ProbeConfig
from marrowlens.errors import MarrowLensError
from marrowlens.probes.losses import per_sample_loss, weighted_mean
from marrowlens.registry import load_registered

ArrayLike: TypeAlias = np.ndarray | Sequence[Any]  # labels and patient groups: arrays or lists
BLOCK = 65536  # rows per block when streaming a memory map
MIN_VAL_CELLS = 3  # cells of every class a validation fold must hold to be used for early stopping
SMALL_BLOCK = 8192  # rows per block for float64 statistics and validation passes (bounded temporaries)


def as_rows(X: Any, rows: np.ndarray | None = None) -> np.ndarray:
    """A C-contiguous float32 copy of ``X[rows]`` (all rows when None), read block by block."""
    if not hasattr(X, "shape"):  # lists; arrays, memory maps and row views are read as they are
        X = np.asarray(X, dtype=np.float32)
    if len(X.shape) != 2:
        raise ValueError(f"features must be 2-D (one row per cell), not of shape {X.shape}")
    index = np.arange(len(X)) if rows is None else np.asarray(rows)
    out = np.empty((len(index), X.shape[1]), dtype=np.float32)
    for start in range(0, len(index), BLOCK):
        chunk = index[start : start + BLOCK]
        if len(chunk) and chunk[-1] - chunk[0] == len(chunk) - 1 and np.all(np.diff(chunk) == 1):
            out[start : start + len(chunk)] = X[chunk[0] : chunk[-1] + 1]
        else:
            out[start : start + len(chunk)] = X[np.sort(chunk)][np.argsort(np.argsort(chunk))]
    return out


class RowView:
    """Rows of a (memory-mapped) matrix, read only when a head asks: one copy, in the head."""

    def __init__(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        self.vectors, self.rows = vectors, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), vectors.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        return as_rows(self.vectors, self.rows[key])


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` intra-op threads inside the block, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _column_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and standard deviation in float64, accumulated block by block."""
    total = np.zeros(features.shape[1])
    squares = np.zeros(features.shape[1])
    for start in range(0, len(features), SMALL_BLOCK):
        block = features[start : start + SMALL_BLOCK].astype(np.float64)
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    mean = total / len(features)
    std = np.sqrt(np.maximum(squares / len(features) - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def _standardise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardise ``features`` in place, block by block (no full-size temporaries); returns mean and scale."""
    mean, scale = _column_stats(features)
    for start in range(0, len(features), BLOCK):
        block = features[start : start + BLOCK]
        block -= mean
        block /= scale
    return mean, scale


def _encode(y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    classes, codes = np.unique(np.asarray(y), return_inverse=True)
    return classes, codes.astype(np.int64)


def _class_weights(codes: np.ndarray, n_classes: int, mode: str | None) -> np.ndarray | None:
    if mode in (None, "none"):
        return None
    if mode != "balanced":
        raise ValueError(f"class_weight must be None, 'none' or 'balanced', not {mode!r}")
    present = np.unique(codes)
    weights = np.ones(n_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=codes)
    return weights


def class_weight_of(config: ProbeConfig) -> str | None:
    return None if config.imbalance.class_weight == "none" else config.imbalance.class_weight


class Head:
    """What the probe code asks of a head beyond scikit-learn's contract; ``HEADS`` maps names to subclasses.

    A head builds its constructor parameters from a :class:`ProbeConfig`, writes what it needs into
    ``head.safetensors`` and rebuilds itself from that (``probe.json`` records its registry name and
    parameters), so saving and loading dispatch on the name and never on "not linear".
    """

    name: ClassVar[str]
    trains_with_loss: ClassVar[bool] = False  # whether config.loss applies (probe.json, noise-sweep)
    classes_: np.ndarray  # set by fit (or from_saved)

    def fit(self, X: Any, y: ArrayLike, groups: ArrayLike | None = None) -> Head:
        raise NotImplementedError

    def predict_proba(self, X: Any) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def resolve(cls, config: ProbeConfig) -> type[Head]:
        """The class that trains for ``config`` when it names this head: itself, unless a head hands over."""
        return cls

    @classmethod
    def config_params(cls, config: ProbeConfig) -> dict[str, Any]:
        """Constructor parameters from a probe config."""
        raise NotImplementedError

    def saved_tensors(
        self, train_rows: np.ndarray, train_labels: np.ndarray, classes: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """What ``head.safetensors`` holds for this head (given the probe's training rows and labels)."""
        raise NotImplementedError

    @classmethod
    def saved_training_set(
        cls, classes: Sequence[str], tensors: dict[str, torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The training rows and labels a loaded probe carries: none for a head that keeps only weights."""
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=str)

    @classmethod
    def from_saved(
        cls,
        params: dict[str, Any],
        classes: Sequence[str],
        tensors: dict[str, torch.Tensor],
        training_vectors: Callable[[], np.ndarray] | None = None,
    ) -> Head:
        """The fitted head from its saved parameters and tensors.

        ``training_vectors`` reads its training store if it needs one.
        """
        raise NotImplementedError

    def fitted_state(self) -> dict[str, Any]:
        """JSON-able facts about the fit, for ``probe.json`` and reports."""
        raise NotImplementedError


C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # inverse L2 strengths (see config.LinearHeadConfig)


def _inner_folds(
    codes: np.ndarray, groups: ArrayLike | None, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped, stratified folds in which both parts hold every class (others are dropped).

    Without ``groups`` every cell is its own group. Fewer than two patients, or no usable fold, gives none.
    """
    group_array = np.arange(len(codes)) if groups is None else np.asarray(groups)
    n_groups = len(np.unique(group_array))
    if n_groups < 2 or len(codes) < 4:
        return []
    n_classes = int(codes.max()) + 1
    splitter = StratifiedGroupKFold(n_splits=min(n_splits, n_groups), shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class": expected with few patients
        splits = list(splitter.split(np.zeros(len(codes)), codes, group_array))
    return [
        (train, test)
        for train, test in splits
        if len(np.unique(codes[train])) == n_classes and len(np.unique(codes[test])) == n_classes
    ]


class LogisticProbe(Head, ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Multinomial (binary: logistic) regression by scikit-learn's lbfgs; C by grouped balanced accuracy.

    ``LogisticRegressionCV`` fits the whole C grid on each inner fold as one regularisation path (each C
    warm-starts from the previous, strongest L2 first), keeps the C with the best mean balanced accuracy
    over the folds (ties: the smaller C), and refits on every cell warm-started from the folds' mean
    coefficients. With too few patients for a fold holding every class on both sides, the middle C of the
    grid is fitted without selection (``selection_`` says so).

    ``fit(X, y, groups)``: ``groups`` (patients) make the inner folds patient-grouped.

    BLAS runs on ``n_threads`` threads (1 by default): on the shared 2-core VM under load the C search
    on 3,739 x 512 cells took 0.4 s with one BLAS thread and 24.5 s with two (threads spinning on
    busy cores). ``n_jobs`` runs inner folds in parallel processes, never more than folds or cores.

    Prediction is hand-written from ``coef_``/``intercept_`` (softmax, or the logistic function for two
    classes, exactly as scikit-learn's ``predict_proba``), so a probe loaded from ``head.safetensors``
    predicts without a pickled scikit-learn object.
    """

    name = "logistic"

    def __init__(
        self,
        c_values: Sequence[float] = C_GRID,
        inner_folds: int = 3,
        class_weight: str | None = None,
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state: int = 0,
        n_jobs: int = 1,
        n_threads: int = 1,
    ) -> None:
        self.c_values = c_values
        self.inner_folds = inner_folds
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.n_threads = n_threads

    def fit(self, X: Any, y: ArrayLike, groups: ArrayLike | None = None) -> LogisticProbe:
        self.classes_, codes = _encode(y)
        if len(self.classes_) < 2:
            raise ValueError("a probe needs at least two classes")
        features = as_rows(X)
        if len(features) != len(codes):
            raise ValueError(f"X has {len(features)} rows but y has {len(codes)}")
        self.n_features_in_ = features.shape[1]
        self.mean_, self.scale_ = _standardise(features)  # lbfgs converges in far fewer steps on standardised features
        if self.class_weight not in (None, "none", "balanced"):
            raise ValueError(f"class_weight must be None, 'none' or 'balanced', not {self.class_weight!r}")
        weight = "balanced" if self.class_weight == "balanced" else None
        c_values = sorted(float(c) for c in self.c_values)
        folds = _inner_folds(codes, groups, self.inner_folds, self.random_state)
        common = {"solver": "lbfgs", "max_iter": self.max_iter, "tol": self.tol, "class_weight": weight}
        with warnings.catch_warnings(), threadpool_limits(limits=max(1, self.n_threads), user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)  # recorded as ``converged`` instead, once per fit
            if folds:
                jobs = max(1, min(len(folds), os.cpu_count() or 1, self.n_jobs if self.n_jobs > 0 else len(folds)))
                search = LogisticRegressionCV(
                    Cs=c_values,
                    l1_ratios=(0.0,),
                    cv=folds,
                    scoring="balanced_accuracy",
                    n_jobs=jobs,
                    use_legacy_attributes=False,
                    **common,
                ).fit(features, codes)
                model: Any = search
                self.C_ = float(search.C_)
                self.cv_scores_ = {f"{c:g}": float(v) for c, v in zip(c_values, search.scores_.mean(axis=(0, 1)))}
                self.selection_ = f"balanced accuracy on {len(folds)} patient-grouped inner folds"
            else:
                self.C_ = c_values[len(c_values) // 2]
                self.cv_scores_ = {}
                self.selection_ = "none: too few patients for inner folds holding every class; middle of the C grid"
                model = LogisticRegression(C=self.C_, **common).fit(features, codes)
        self.n_iter_ = int(np.max(model.n_iter_))
        self.converged_ = self.n_iter_ < self.max_iter
        self.coef_ = np.asarray(model.coef_, dtype=np.float32)
        self.intercept_ = np.asarray(model.intercept_, dtype=np.float32)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coef_")
        if not hasattr(X, "shape"):
            X = np.asarray(X, dtype=np.float32)
        if len(X.shape) != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has shape {X.shape}, but {type(self).__name__} expects {self.n_features_in_} features")
        out = np.empty((len(X), len(self.coef_)), dtype=np.float64)
        with threadpool_limits(limits=max(1, self.n_threads), user_api="blas"):
            for start in range(0, len(X), BLOCK):
                block = (as_rows(X[start : start + BLOCK]) - self.mean_) / self.scale_
                out[start : start + len(block)] = block.astype(np.float64) @ self.coef_.T.astype(np.float64)
        out += self.intercept_
        return out[:, 0] if len(self.coef_) == 1 else out  # two classes: one score, as scikit-learn's

    def predict_proba(self, X: Any) -> np.ndarray:
        scores = self.decision_function(X)
        if scores.ndim == 1:  # two classes: P(second class) = logistic(score)
            positive = expit(scores)
            return np.stack([1.0 - positive, positive], axis=1)
        return np.asarray(softmax(scores, axis=1))

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)
        return np.asarray(self.classes_[np.argmax(proba, axis=1)])

    def fitted_state(self) -> dict[str, Any]:
        """The chosen C, by which score, and each C's mean inner-fold score, for ``probe.json`` and reports."""
        return {
            "C": self.C_,
            "selection": self.selection_,
            "scores": self.cv_scores_,
            "converged": self.converged_,
            "iterations": self.n_iter_,
        }

    @classmethod
    def config_params(cls, config: ProbeConfig) -> dict[str, Any]:
        return {
            "c_values": list(config.linear.c_values),
            "inner_folds": config.linear.inner_folds,
            "class_weight": class_weight_of(config),
            "random_state": config.seed,
        }

    def saved_tensors(
        self, train_rows: np.ndarray, train_labels: np.ndarray, classes: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        check_is_fitted(self, "coef_")
        arrays = {"coef": self.coef_, "intercept": self.intercept_, "mean": self.mean_, "scale": self.scale_}
        return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}

    @classmethod
    def from_saved(
        cls,
        params: dict[str, Any],
        classes: Sequence[str],
        tensors: dict[str, torch.Tensor],
        training_vectors: Callable[[], np.ndarray] | None = None,
    ) -> LogisticProbe:
        missing = [n for n in ("coef", "intercept", "mean", "scale") if n not in tensors]
        if missing:
            raise ValueError(f"head weights lack {missing}")
        head = cls(**params)
        head.classes_ = np.asarray(classes, dtype=object)
        head.coef_, head.intercept_ = tensors["coef"].numpy(), tensors["intercept"].numpy()
        head.mean_, head.scale_ = tensors["mean"].numpy(), tensors["scale"].numpy()
        head.n_features_in_ = head.mean_.shape[0]
        return head


class LinearProbe(Head, ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Linear (or 1-hidden-layer) softmax head; L2 strength chosen by grouped early stopping.

    With ``early_stopping=False`` (or too few cells or patients to hold any out) it trains
    ``max_epochs`` on every cell with the middle weight decay of the grid.

    ``fit(X, y, groups)``: ``groups`` (patients) make the validation split patient-grouped; without
    them every cell is its own group.
    """

    name = "linear"
    trains_with_loss = True

    @classmethod
    def resolve(cls, config: ProbeConfig) -> type[Head]:
        """scikit-learn's :class:`LogisticProbe` for plain CE without hidden layer or balanced sampling when
        ``linear.solver`` is ``sklearn``; this torch head for the rest (GCE/SCE/focal, hidden layer, sampling)."""
        lin = config.linear
        plain = config.loss.name == "ce" and lin.hidden_dim == 0 and config.imbalance.sampling == "none"
        return LogisticProbe if lin.solver == "sklearn" and plain else cls

    def __init__(
        self,
        hidden_dim: int = 0,
        loss: str = "ce",
        gce_q: float = 0.7,
        sce_alpha: float = 0.1,
        sce_beta: float = 1.0,
        focal_gamma: float = 2.0,
        class_weight: str | None = None,
        sampling: str = "none",
        weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1),
        lr: float = 1e-2,
        batch_size: int = 1024,
        max_epochs: int = 100,
        patience: int = 8,
        val_fraction: float = 0.2,
        refit: bool = True,
        early_stopping: bool = True,
        random_state: int = 0,
        n_threads: int = 1,
        progress: bool = False,
    ) -> None:
        self.hidden_dim = hidden_dim
        self.loss = loss
        self.gce_q = gce_q
        self.sce_alpha = sce_alpha
        self.sce_beta = sce_beta
        self.focal_gamma = focal_gamma
        self.class_weight = class_weight
        self.sampling = sampling
        self.weight_decays = weight_decays
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.refit = refit
        self.early_stopping = early_stopping
        self.random_state = random_state
        self.n_threads = n_threads
        self.progress = progress

    # ------------------------------------------------------------------ fitting

    def fit(self, X: Any, y: ArrayLike, groups: ArrayLike | None = None) -> LinearProbe:
        with torch_threads(self.n_threads):
            return self._fit(X, y, groups)

    def _fit(self, X: Any, y: ArrayLike, groups: ArrayLike | None) -> LinearProbe:
        self.classes_, codes = _encode(y)
        if len(self.classes_) < 2:
            raise ValueError("a probe needs at least two classes")
        features = as_rows(X)
        if len(features) != len(codes):
            raise ValueError(f"X has {len(features)} rows but y has {len(codes)}")
        self.n_features_in_ = features.shape[1]
        self.mean_, self.scale_ = _standardise(features)
        weights = _class_weights(codes, len(self.classes_), self.class_weight)
        self._class_weight_t = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        generator = torch.Generator().manual_seed(self.random_state)
        x_all, y_all = torch.from_numpy(features), torch.from_numpy(codes)
        everything = torch.arange(len(codes))  # rows are indexed, never copied: one feature matrix in memory

        train, val = self._validation_split(codes, groups) if self.early_stopping else (None, None)
        decays = [float(w) for w in self.weight_decays]
        if val is None:  # early stopping off, or too few cells/groups to hold any out
            self.validation_ = "none: fixed epochs, middle of the weight-decay grid"
            self.weight_decay_ = decays[len(decays) // 2]
            self.best_epoch_ = self.max_epochs
            params = self._train(x_all, y_all, everything, [self.weight_decay_], self.max_epochs, generator)
        else:
            self.validation_ = f"{len(val)} cells held out"
            params, best, val_losses = self._search(
                x_all, y_all, torch.from_numpy(train), torch.from_numpy(val), decays, generator
            )
            self.val_losses_ = [float(v) for v in val_losses]
            self.weight_decay_ = decays[best]
            self.best_epoch_ = self._best_epochs[best]
            params = [p[best : best + 1].clone() for p in params]
            if self.refit:
                params = self._train(x_all, y_all, everything, [self.weight_decay_], self.best_epoch_, generator)
        self.params_ = [p.detach()[0].contiguous() for p in params]
        return self

    def _validation_split(self, codes: np.ndarray, groups: ArrayLike | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Hold out whole patients, stratified, for early stopping.

        Of the folds whose training part has every class, the one whose held-out patients carry the
        most cells of their rarest class is used, if that is at least ``MIN_VAL_CELLS``: a validation
        set with one cell of a class stops training on that cell's whim. Otherwise there is none.
        """
        n = len(codes)
        everything = np.arange(n)
        group_array = np.arange(n) if groups is None else np.asarray(groups)
        n_groups = len(np.unique(group_array))
        if n < 10 or n_groups < 2:
            return everything, None
        n_classes = int(codes.max()) + 1
        splitter = StratifiedGroupKFold(
            n_splits=min(max(2, round(1 / self.val_fraction)), n_groups), shuffle=True, random_state=self.random_state
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class": fine for a hold-out
            folds = [
                (train, val)
                for train, val in splitter.split(np.zeros(n), codes, group_array)
                if len(np.unique(codes[train])) == n_classes
            ]
        if not folds:
            return everything, None
        train, val = max(folds, key=lambda fold: np.bincount(codes[fold[1]], minlength=n_classes).min())
        if np.bincount(codes[val], minlength=n_classes).min() < MIN_VAL_CELLS:
            return everything, None
        overlap = set(group_array[train]) & set(group_array[val])
        if overlap:
            raise AssertionError(f"validation split leaks patients {sorted(overlap)[:3]}")
        return train, val

    def _init_params(self, n_models: int, n_in: int, y: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """Zero (or small random) weights; the output bias starts at the log class prior the loss
        sees, so early stopping after a few steps does not leave the head at a uniform prior."""
        n_out = len(self.classes_)
        prior = torch.bincount(y, minlength=n_out).double().clamp(min=1)
        if self.sampling == "balanced":
            prior = torch.ones(n_out, dtype=torch.float64)
        elif self._class_weight_t is not None:
            prior = prior * self._class_weight_t.double()
        log_prior = torch.log(prior / prior.sum()).float()
        if self.hidden_dim:
            bound1, bound2 = 1 / math.sqrt(n_in), 1 / math.sqrt(self.hidden_dim)
            shapes = [
                ((n_models, n_in, self.hidden_dim), bound1),
                ((n_models, self.hidden_dim), bound1),
                ((n_models, self.hidden_dim, n_out), bound2),
                ((n_models, n_out), bound2),
            ]
            params = [(torch.rand(shape, generator=generator) * 2 - 1) * bound for shape, bound in shapes]
        else:
            params = [torch.zeros(n_models, n_in, n_out), torch.zeros(n_models, n_out)]
        params[-1] = log_prior.expand(n_models, n_out).clone()
        return [p.requires_grad_(True) for p in params]

    def _batch_size(self, n: int) -> int:
        """At least 8 steps per epoch, so small training sets still move between validations."""
        return max(16, min(self.batch_size, math.ceil(n / 8)))

    def _forward(self, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits of every model in the grid: ``(models, cells, classes)``; ``x`` is read once."""
        n_models = params[0].shape[0]
        first = params[0]
        out = (x @ first.permute(1, 0, 2).reshape(first.shape[1], -1)).view(len(x), n_models, -1).transpose(0, 1)
        out = out + params[1][:, None, :]
        if self.hidden_dim:
            out = torch.relu(out)
            out = torch.bmm(out, params[2]) + params[3][:, None, :]
        return out

    def _batch_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-model loss ``(models,)``; each model's gradient only reaches its own weights."""
        n_models, n_cells, n_classes = logits.shape
        losses = per_sample_loss(
            self.loss,
            logits.reshape(-1, n_classes),
            target.repeat(n_models),
            gce_q=self.gce_q,
            sce_alpha=self.sce_alpha,
            sce_beta=self.sce_beta,
            focal_gamma=self.focal_gamma,
        ).view(n_models, n_cells)
        return weighted_mean(losses, target, self._class_weight_t)

    def _epoch_order(self, codes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(codes)
        if self.sampling == "balanced":
            counts = torch.bincount(codes, minlength=len(self.classes_)).float()
            odds = (1.0 / counts.clamp(min=1))[codes]
            return torch.multinomial(odds, n, replacement=True, generator=generator)
        if self.sampling not in ("none", None):
            raise ValueError(f"sampling must be 'none' or 'balanced', not {self.sampling!r}")
        return torch.randperm(n, generator=generator)

    def _step_epoch(
        self,
        params: list[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        decays: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        rows: torch.Tensor,
        generator: torch.Generator,
    ) -> None:
        order = rows[self._epoch_order(y[rows], generator)]
        batch = self._batch_size(len(order))
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = self._batch_loss(self._forward(params, x[index]), y[index])
            penalty = sum(p.pow(2).flatten(1).sum(1) for p in params[::2])  # L2 on weights, not biases
            (loss + 0.5 * decays * penalty).sum().backward()  # type: ignore[no-untyped-call]  # untyped in torch
            optimizer.step()

    def _train(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        rows: torch.Tensor,
        decays: list[float],
        epochs: int,
        generator: torch.Generator,
    ) -> list[torch.Tensor]:
        params = self._init_params(len(decays), x.shape[1], y[rows], generator)
        optimizer = torch.optim.Adam(params, lr=self.lr)
        decay_t = torch.tensor(decays)
        for _ in tqdm(range(epochs), desc="probe: refit", leave=False, disable=None if self.progress else True):
            self._step_epoch(params, optimizer, decay_t, x, y, rows, generator)
        return params

    def _search(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        train: torch.Tensor,
        val: torch.Tensor,
        decays: list[float],
        generator: torch.Generator,
    ) -> tuple[list[torch.Tensor], int, list[float]]:
        """Train the whole grid together; keep each model's best state by validation loss."""
        params = self._init_params(len(decays), x.shape[1], y[train], generator)
        optimizer = torch.optim.Adam(params, lr=self.lr)
        decay_t = torch.tensor(decays)
        best_loss = torch.full((len(decays),), float("inf"))
        best_params = [p.detach().clone() for p in params]
        self._best_epochs = [0] * len(decays)
        waited = torch.zeros(len(decays), dtype=torch.long)
        bar = tqdm(
            range(self.max_epochs),
            desc="probe: weight-decay search",
            leave=False,
            disable=None if self.progress else True,
        )
        for epoch in bar:
            self._step_epoch(params, optimizer, decay_t, x, y, train, generator)
            with torch.no_grad():
                val_loss = self._validation_loss(params, x, y, val)
                better = val_loss < best_loss - 1e-6
                for model in torch.nonzero(better).flatten().tolist():
                    self._best_epochs[model] = epoch + 1
                    for saved, current in zip(best_params, params):
                        saved[model] = current[model]
                best_loss = torch.where(better, val_loss, best_loss)
                waited = torch.where(better, torch.zeros_like(waited), waited + 1)
            if bool((waited >= self.patience).all()):
                break
        best = int(torch.argmin(best_loss))
        return best_params, best, best_loss.tolist()

    def _validation_loss(
        self, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        total = torch.zeros(params[0].shape[0])
        for start in range(0, len(rows), SMALL_BLOCK):
            index = rows[start : start + SMALL_BLOCK]
            total += self._batch_loss(self._forward(params, x[index]), y[index]) * len(index)
        return total / len(rows)

    # ------------------------------------------------------------------ prediction

    def decision_function(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "params_")
        params = [p[None] for p in self.params_]
        out = np.empty((len(X), len(self.classes_)), dtype=np.float32)
        with torch.no_grad(), torch_threads(self.n_threads):
            for start in range(0, len(X), BLOCK):
                block = (as_rows(X[start : start + BLOCK]) - self.mean_) / self.scale_
                out[start : start + len(block)] = self._forward(params, torch.from_numpy(block))[0].numpy()
        return out

    def predict_proba(self, X: Any) -> np.ndarray:
        logits = torch.from_numpy(self.decision_function(X)).double()
        return torch.softmax(logits, dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        return np.asarray(self.classes_[np.argmax(self.predict_proba(X), axis=1)])

    # ------------------------------------------------------------------ persistence

    @classmethod
    def config_params(cls, config: ProbeConfig) -> dict[str, Any]:
        lin, loss = config.linear, config.loss
        return {
            "hidden_dim": lin.hidden_dim,
            "loss": loss.name,
            "gce_q": loss.gce_q,
            "sce_alpha": loss.sce_alpha,
            "sce_beta": loss.sce_beta,
            "focal_gamma": loss.focal_gamma,
            "class_weight": class_weight_of(config),
            "sampling": config.imbalance.sampling,
            "weight_decays": list(lin.weight_decays),
            "lr": lin.lr,
            "batch_size": lin.batch_size,
            "max_epochs": lin.max_epochs,
            "patience": lin.patience,
            "val_fraction": lin.val_fraction,
            "refit": lin.refit,
            "early_stopping": lin.early_stopping,
            "random_state": config.seed,
        }

    def saved_tensors(
        self, train_rows: np.ndarray, train_labels: np.ndarray, classes: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        return self.tensors()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Weights and standardisation, for ``head.safetensors``."""
        check_is_fitted(self, "params_")
        names = ["w1", "b1", "w2", "b2"] if self.hidden_dim else ["weight", "bias"]
        out = {name: p.contiguous() for name, p in zip(names, self.params_)}
        out.update(mean=torch.from_numpy(self.mean_), scale=torch.from_numpy(self.scale_))
        return out

    def fitted_state(self) -> dict[str, Any]:
        """JSON-able facts about the fit (chosen weight decay, epochs), for ``probe.json``."""
        return {"weight_decay": self.weight_decay_, "epochs": self.best_epoch_, "validation": self.validation_}

    @classmethod
    def from_saved(
        cls,
        params: dict[str, Any],
        classes: Sequence[str],
        tensors: dict[str, torch.Tensor],
        training_vectors: Callable[[], np.ndarray] | None = None,
    ) -> LinearProbe:
        head = cls(**params)
        head.classes_ = np.asarray(classes, dtype=object)
        names = ["w1", "b1", "w2", "b2"] if head.hidden_dim else ["weight", "bias"]
        missing = [n for n in (*names, "mean", "scale") if n not in tensors]
        if missing:
            raise ValueError(f"head weights lack {missing}")
        head.params_ = [tensors[n].float() for n in names]
        head.mean_, head.scale_ = tensors["mean"].numpy(), tensors["scale"].numpy()
        head.n_features_in_ = head.mean_.shape[0]
        return head


class KNNProbe(Head, ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Temperature-weighted k-NN vote on cosine similarity (DINO's k-NN evaluation).

    Saved as its training rows and label codes, not vectors: the training store is on disk and
    fingerprinted, and a copy would double a store of millions of cells.
    """

    name = "knn"

    def __init__(
        self, k: int = 20, temperature: float = 0.07, class_weight: str | None = None, batch_size: int = 4096
    ) -> None:
        self.k = k
        self.temperature = temperature
        self.class_weight = class_weight
        self.batch_size = batch_size

    def fit(self, X: Any, y: ArrayLike, groups: ArrayLike | None = None) -> KNNProbe:
        self.classes_, codes = _encode(y)
        if not hasattr(X, "shape"):
            X = np.asarray(X, dtype=np.float32)
        if len(X) != len(codes):
            raise ValueError(f"X has {len(X)} rows but y has {len(codes)}")
        self.n_features_in_ = int(X.shape[1])
        self.index_ = faiss.IndexFlatIP(self.n_features_in_)
        for start in range(0, len(codes), BLOCK):  # normalised block by block: the index holds the only copy
            block = as_rows(X[start : start + BLOCK])
            faiss.normalize_L2(block)
            self.index_.add(block)
        self.labels_ = codes
        weights = _class_weights(codes, len(self.classes_), self.class_weight)
        self.vote_weight_ = np.ones(len(self.classes_)) if weights is None else weights
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "index_")
        k = min(self.k, self.index_.ntotal)
        out = np.empty((len(X), len(self.classes_)))
        for start in range(0, len(X), self.batch_size):
            query = as_rows(X[start : start + self.batch_size])
            faiss.normalize_L2(query)
            sims, neighbours = self.index_.search(query, k)
            votes = np.exp(sims.astype(np.float64) / self.temperature) * self.vote_weight_[self.labels_[neighbours]]
            scores = np.zeros((len(query), len(self.classes_)))
            np.add.at(scores, (np.arange(len(query))[:, None], self.labels_[neighbours]), votes)
            out[start : start + len(query)] = scores / scores.sum(axis=1, keepdims=True)
        return out

    def predict(self, X: Any) -> np.ndarray:
        return np.asarray(self.classes_[np.argmax(self.predict_proba(X), axis=1)])

    def fitted_state(self) -> dict[str, Any]:
        return {"n_train": int(self.index_.ntotal)}

    @classmethod
    def config_params(cls, config: ProbeConfig) -> dict[str, Any]:
        return {"k": config.knn.k, "temperature": config.knn.temperature, "class_weight": class_weight_of(config)}

    def saved_tensors(
        self, train_rows: np.ndarray, train_labels: np.ndarray, classes: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        codes = np.array([list(classes).index(str(c)) for c in train_labels], dtype=np.int64)
        return {
            "train_rows": torch.from_numpy(np.asarray(train_rows, dtype=np.int64)),
            "train_labels": torch.from_numpy(codes),
        }

    @classmethod
    def saved_training_set(
        cls, classes: Sequence[str], tensors: dict[str, torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray]:
        codes = tensors["train_labels"].numpy()
        return tensors["train_rows"].numpy(), np.asarray(classes, dtype=object)[codes].astype(str)

    @classmethod
    def from_saved(
        cls,
        params: dict[str, Any],
        classes: Sequence[str],
        tensors: dict[str, torch.Tensor],
        training_vectors: Callable[[], np.ndarray] | None = None,
    ) -> KNNProbe:
        if training_vectors is None:
            raise ValueError("a k-NN head is rebuilt from its training store: pass training_vectors")
        rows, labels = cls.saved_training_set(classes, tensors)
        return cls(**params).fit(RowView(training_vectors(), rows), labels)


# config.HEAD_CLASSES names them (this module's own classes resolve from it as it finishes importing).
HEADS: dict[str, type[Head]] = load_registered(HEAD_CLASSES)


def head_class(name: str, where: str = "the probe config") -> type[Head]:
    """The registered head called ``name``; an unknown one is a one-line error naming the known ones."""
    if name not in HEADS:
        raise MarrowLensError(
            f"{where} names head {name!r}, which this version does not know (known: {', '.join(HEADS)})"
        )
    return HEADS[name]


def head_for(config: ProbeConfig) -> type[Head]:
    """The head class a config trains: its named head, as that head resolves the config."""
    return head_class(config.head).resolve(config)


def make_head(kind: str, params: dict[str, Any]) -> Head:
    """Build an unfitted head from its registry name and constructor parameters."""
    return head_class(kind)(**params)
