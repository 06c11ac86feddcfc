r"""Built-in training problems for ``subriemann run`` (no download at run time).

Every builder returns a :class:`Dataset`: float64 ``inputs`` of shape
``[N, M]`` and ``targets`` of shape ``[N, Q]``, with a short description.

* ``"diabetes"``: scikit-learn's diabetes regression (442 patients, 10
  features, 1 target), a seeded subset; inputs and targets standardized.
* ``"digits"``: scikit-learn's 8×8 digits (64 pixels, 10 classes), a seeded
  subset; inputs standardized, targets one-hot.
* ``"iris"``: scikit-learn's iris (4 features, 3 classes), targets one-hot.
* ``"teacher"``: a teacher–student regression: Gaussian inputs and the outputs
  of a fixed random tanh network (no scikit-learn needed).

scikit-learn ships the first three inside its wheel; it is an optional
dependency (``pip install subriemann[data]``).  :func:`default_dataset`
falls back to ``"teacher"`` when it is missing.

A user's own data comes from an ``.npz`` archive with the arrays ``inputs``
and ``targets`` (:func:`load_npz`).

Examples
--------
>>> from subriemann.app.datasets import load_dataset
>>> ds = load_dataset("teacher", n_samples=6, seed=0)
>>> tuple(ds.inputs.shape), tuple(ds.targets.shape)
((6, 4), (6, 1))
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from subriemann.analysis.cross_entropy import check_smoothing, smooth_labels
from subriemann.validation import check_int

__all__ = [
    "Dataset",
    "BUILTIN",
    "CLASSIFICATION",
    "has_sklearn",
    "default_dataset",
    "digits_split",
    "load_dataset",
    "load_npz",
    "labels_to_one_hot",
    "one_hot",
    "DigitsProblem",
    "load_digits_problem",
]

BUILTIN = ("diabetes", "digits", "iris", "teacher")
"""Names accepted by :func:`load_dataset` (besides a path to an ``.npz`` file)."""

CLASSIFICATION = ("digits", "iris")
"""Built-in datasets with one-hot (probability-row) targets."""


@dataclass
class Dataset:
    """A training set.

    Attributes
    ----------
    name : str
        Built-in name or the ``.npz`` path.
    inputs : Tensor, shape=[N, ...]
        float64.
    targets : Tensor, shape=[N, Q]
        float64: real values (regression) or probability rows (classification).
    task : {"regression", "classification"}
    description : str
        One line, for the report.
    """

    name: str
    inputs: Tensor
    targets: Tensor
    task: str
    description: str
    labels: Tensor | None = None
    """Integer class indices ``[N]`` (int64) when an ``.npz`` file gave its targets as
    integer labels (``targets`` then holds them as one real column); else None."""

    @property
    def num_samples(self) -> int:
        """N."""
        return int(self.inputs.shape[0])

    @property
    def num_outputs(self) -> int:
        """Q."""
        return int(self.targets.shape[1])

    @property
    def input_dim(self) -> int:
        """M, the number of features (the product of the non-batch input dims)."""
        return int(math.prod(self.inputs.shape[1:]))


def has_sklearn() -> bool:
    """Whether scikit-learn (and so the packaged real datasets) can be imported."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def default_dataset() -> str:
    """``"diabetes"`` when scikit-learn is installed, else ``"teacher"``."""
    return "diabetes" if has_sklearn() else "teacher"


def _standardize(a: np.ndarray) -> np.ndarray:
    """Columns to mean 0 and standard deviation 1 (constant columns are only centred)."""
    mu = a.mean(axis=0)
    sd = a.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return (a - mu) / sd


def _subset(n_total: int, n_samples: int | None, seed: int, what: str) -> np.ndarray:
    """A seeded subset of ``range(n_total)`` of size ``n_samples`` (all when None).

    Raises ``ValueError`` when ``n_samples > n_total`` (never a silent cap).
    """
    if n_samples is not None and n_samples > n_total:
        raise ValueError(
            f"n_samples = {n_samples} is larger than the {n_total} samples of {what}"
        )
    if n_samples is None or n_samples == n_total:
        return np.arange(n_total)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n_samples, replace=False))


def digits_split(
    n_train: int | None = None, n_test: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1,797 digits in a fixed stratified 80/20 train/test split.

    The split is ``train_test_split(test_size=0.2, random_state=0, stratify=labels)``,
    so it is the same on every machine; ``n_train`` / ``n_test`` keep only the first
    rows of each part (smoke runs).  Pixels are standardized with the mean and the
    standard deviation of the kept training rows (constant pixels are only centred).

    Returns
    -------
    x_train, y_train, x_test, y_test
        Inputs ``shape=[n, 64]`` in ``dtype`` and integer class labels ``shape=[n]``.

    Examples
    --------
    >>> x, y, xt, yt = digits_split(n_train=80, n_test=40)
    >>> x.shape, yt.shape
    (torch.Size([80, 64]), torch.Size([40]))
    """
    if not has_sklearn():
        raise ImportError("digits_split needs scikit-learn: pip install 'subriemann[data]'")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(
        d.data, d.target, test_size=0.2, random_state=0, stratify=d.target
    )
    xtr, ytr, xte, yte = xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]
    mean, std = xtr.mean(0), xtr.std(0)
    std[std == 0] = 1.0

    def as_tensor(a: np.ndarray) -> Tensor:
        return torch.tensor((a - mean) / std, dtype=dtype)

    return as_tensor(xtr), torch.tensor(ytr), as_tensor(xte), torch.tensor(yte)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer class labels ``[N]`` as one-hot rows ``[N, num_classes]`` (float64)."""
    out = np.zeros((labels.shape[0], num_classes), dtype=np.float64)
    out[np.arange(labels.shape[0]), labels.astype(np.int64)] = 1.0
    return out


def _check_n(n_samples: int | None) -> None:
    if n_samples is not None:
        check_int(n_samples, "n_samples", low=1)


def _sklearn(name: str, n_samples: int | None, seed: int) -> Dataset:
    try:
        from sklearn import datasets as skd
    except ImportError:
        raise ValueError(
            f"dataset {name!r} needs scikit-learn (pip install 'subriemann[data]'); "
            "use --data teacher or an .npz file"
        ) from None
    if name == "diabetes":
        x, y = skd.load_diabetes(return_X_y=True)
        idx = _subset(len(x), n_samples, seed, name)
        inputs = _standardize(x[idx])
        targets = _standardize(y[idx].reshape(-1, 1))
        desc = (f"diabetes regression (scikit-learn), {len(idx)} of {len(x)} patients, "
                "10 standardized features, standardized target")
        task = "regression"
    else:
        x, y = (skd.load_digits if name == "digits" else skd.load_iris)(return_X_y=True)
        idx = _subset(len(x), n_samples, seed, name)
        inputs = _standardize(x[idx])
        k = int(y.max()) + 1
        targets = one_hot(y[idx], k)
        desc = (f"{name} classification (scikit-learn), {len(idx)} of {len(x)} samples, "
                f"{x.shape[1]} standardized features, {k} classes one-hot")
        task = "classification"
    return Dataset(name, torch.from_numpy(inputs), torch.from_numpy(targets), task, desc)


def _teacher(n_samples: int | None, seed: int) -> Dataset:
    r"""Teacher–student: :math:`y = W_2\tanh(W_1 x + b_1)` with a fixed random teacher."""
    n = 24 if n_samples is None else n_samples
    m, width = 4, 8
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(n, m, generator=g, dtype=torch.float64)
    w1 = torch.randn(width, m, generator=g, dtype=torch.float64) / math.sqrt(m)
    b1 = 0.1 * torch.randn(width, generator=g, dtype=torch.float64)
    w2 = torch.randn(1, width, generator=g, dtype=torch.float64) / math.sqrt(width)
    y = torch.tanh(x @ w1.T + b1) @ w2.T
    y = (y - y.mean()) / y.std(correction=0).clamp_min(1e-12)
    desc = (f"teacher-student regression, {n} Gaussian inputs in R^{m}, "
            f"targets from a random tanh teacher of width {width} (standardized)")
    return Dataset("teacher", x, y, "regression", desc)


def load_npz(path: str | Path, n_samples: int | None = None, seed: int = 0) -> Dataset:
    """A dataset from an ``.npz`` archive with the arrays ``inputs`` and ``targets``.

    ``inputs`` has shape ``[N, ...]``; ``targets`` ``[N, Q]`` or ``[N]``.  The
    arrays are used as they are (no standardization).  With ``n_samples``
    a seeded subset is taken.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is not a readable ``.npz`` archive, lacks one of the
        arrays, or the arrays are not finite real numbers of matching length.
    """
    _check_n(n_samples)
    p = Path(path)
    inputs, targets = _read_npz(p)
    idx = _subset(inputs.shape[0], n_samples, seed, str(p))
    x = torch.from_numpy(inputs[idx].astype(np.float64))
    y = torch.from_numpy(targets[idx].astype(np.float64))
    labels = None
    if targets.dtype.kind in "iu" and targets.shape[1] == 1:
        labels = torch.from_numpy(targets[idx, 0].astype(np.int64))
    sums = y.sum(dim=1)
    simplex = bool(
        y.shape[1] >= 2 and (y >= 0).all() and torch.allclose(sums, torch.ones_like(sums))
    )
    desc = f"{p.name}: {len(idx)} samples, inputs {tuple(inputs.shape[1:])}, Q = {y.shape[1]}"
    return Dataset(str(p), x, y, "classification" if simplex else "regression", desc, labels)


def _read_npz(p: Path) -> tuple[np.ndarray, np.ndarray]:
    """The arrays ``inputs`` ``[N, ...]`` and ``targets`` ``[N, Q]`` of the file ``p``, checked."""
    inputs, targets = _load_arrays(p)
    for what, a in (("inputs", inputs), ("targets", targets)):
        _check_array(p, what, a)
    if targets.ndim == 1:
        targets = targets.reshape(-1, 1)
    if targets.ndim != 2:
        raise ValueError(f"{p}: targets must have shape (N, Q) or (N,), got {targets.shape}")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{p}: inputs have {inputs.shape[0]} samples but targets have {targets.shape[0]}"
        )
    return inputs, targets


def _load_arrays(p: Path) -> tuple[np.ndarray, np.ndarray]:
    """The arrays ``inputs`` and ``targets`` of the ``.npz`` file ``p``, as they are."""
    if not p.is_file():
        raise FileNotFoundError(f"no data file at {p}")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"cannot read {p}: not an .npz archive (save one with numpy.savez)")
    try:
        with np.load(p, allow_pickle=False) as data:
            files = list(data.files)
            missing = [k for k in ("inputs", "targets") if k not in files]
            if not missing:
                return np.asarray(data["inputs"]), np.asarray(data["targets"])
    except Exception as err:  # zipfile.BadZipFile, object arrays (pickle refused), truncation
        hint = ""
        if "Object arrays" in str(err):
            hint = " (an array has dtype=object; save real numeric arrays)"
        raise ValueError(f"cannot read {p} as an .npz archive: {err}{hint}") from None
    raise ValueError(
        f"{p} has no array named {' or '.join(repr(k) for k in missing)} "
        f"(found: {', '.join(files) or 'none'})"
    )


def _check_array(p: Path, what: str, a: np.ndarray) -> None:
    """``a`` (the array ``what`` of the file ``p``) is real, finite, ``[N, ...]`` with N >= 1."""
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{p}: {what} must be a real numeric array, got dtype {a.dtype}")
    if a.ndim == 0 or a.shape[0] == 0:
        raise ValueError(f"{p}: {what} must have shape (N, ...) with N >= 1")
    if not np.isfinite(a.astype(np.float64)).all():
        raise ValueError(f"{p}: {what} contain NaN or inf")


def labels_to_one_hot(ds: Dataset) -> Dataset:
    r"""The dataset with its integer class labels (``ds.labels``) as one-hot target rows.

    Labels :math:`0, \dots, C-1` become rows of :math:`\mathbb{R}^C`, :math:`C` = the
    largest label + 1.

    Raises
    ------
    ValueError
        Without integer labels, with a negative label, or with fewer than 2 classes.
    """
    if ds.labels is None:
        raise ValueError(f"{ds.name} has no integer class labels")
    lab = ds.labels.numpy()
    k = int(lab.max()) + 1
    if int(lab.min()) < 0 or k < 2:
        raise ValueError(
            f"{ds.name}: integer targets are not class labels 0..C-1 with C >= 2 (found "
            f"{int(lab.min())}..{int(lab.max())}); give one-hot rows (probabilities) instead"
        )
    targets = torch.from_numpy(one_hot(lab, k))
    desc = f"{ds.description}; integer labels one-hot encoded ({k} classes)"
    return Dataset(ds.name, ds.inputs, targets, "classification", desc, ds.labels)


def load_dataset(name: str, n_samples: int | None = None, seed: int = 0) -> Dataset:
    """A built-in dataset by name (see :data:`BUILTIN`), or an ``.npz`` file by path.

    Parameters
    ----------
    name : str
        One of :data:`BUILTIN`, or a path ending in ``.npz``.
    n_samples : int, optional
        Size of the seeded subset (default: all samples; 24 for ``"teacher"``).
    seed : int
        Seed of the subset (and of the teacher).

    Raises
    ------
    ValueError
        For an unknown name, a dataset that needs the missing scikit-learn,
        or a bad ``.npz`` file.
    FileNotFoundError
        For a missing ``.npz`` file.
    """
    _check_n(n_samples)
    if name.endswith(".npz") or "/" in name or "\\" in name:
        return load_npz(name, n_samples, seed)
    if name in ("diabetes", "digits", "iris"):
        return _sklearn(name, n_samples, seed)
    if name == "teacher":
        return _teacher(n_samples, seed)
    raise ValueError(
        f"unknown dataset {name!r}: choose one of {', '.join(BUILTIN)} or a path to an .npz "
        "file with arrays 'inputs' and 'targets'"
    )


# -- a classification problem for the cross-entropy analysis -------------------------------
@dataclass
class DigitsProblem:
    r"""A classification problem from scikit-learn's digits (8×8 images, 64 features).

    Attributes
    ----------
    x_train, x_test : Tensor, shape=[n, 64]
        Standardized with the training mean and standard deviation (constant
        pixels are centred only).
    y_train, y_test : Tensor, shape=[n, Q]
        Smoothed one-hot targets, :math:`(1-\varepsilon)e_{c} + \varepsilon/Q`
        (:func:`subriemann.analysis.cross_entropy.smooth_labels`).
    labels_train, labels_test : Tensor, shape=[n], int64
        Class indices :math:`0..Q-1` (positions in ``classes``).
    classes : tuple of int
        The digits used; class ``i`` is digit ``classes[i]``.
    eps : float
        The smoothing.
    """

    x_train: Tensor
    y_train: Tensor
    labels_train: Tensor
    x_test: Tensor
    y_test: Tensor
    labels_test: Tensor
    classes: tuple[int, ...]
    eps: float

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _digit_classes(classes: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    cls = tuple(int(c) for c in classes)
    if len(cls) < 2 or len(set(cls)) != len(cls) or any(not 0 <= c <= 9 for c in cls):
        raise ValueError(f"classes must be at least 2 distinct digits in 0..9, got {classes!r}")
    return cls


def load_digits_problem(
    n_train: int,
    n_test: int,
    classes: tuple[int, ...] | list[int] = (0, 1, 2),
    *,
    eps: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> DigitsProblem:
    r"""A stratified train/held-out split of scikit-learn's digits, ready for cross-entropy.

    The data ship inside scikit-learn (no download).  Needs the optional ``data``
    extra: ``pip install subriemann[data]``.  The targets are smoothed one-hot
    labels, so that the finite-limit statements of
    :mod:`subriemann.analysis.cross_entropy` apply (docs/theory.md §6).

    Parameters
    ----------
    n_train, n_test : int
        Sizes of the training and held-out sets (stratified by class; each at least
        the number of classes).
    classes : sequence of int
        Distinct digits in 0..9 to keep; :math:`Q` = ``len(classes)`` :math:`\ge 2`.
    eps : float
        Label smoothing of the targets, in :math:`[0, 1)` (``0``: one-hot, no finite limit).
    seed : int
        Seed of the split.
    dtype : torch.dtype

    Returns
    -------
    DigitsProblem

    Raises
    ------
    ImportError
        scikit-learn is not installed.
    ValueError
        Bad sizes or classes.
    """
    if not has_sklearn():
        raise ImportError(
            "load_digits_problem needs scikit-learn (the optional 'data' extra): "
            "pip install subriemann[data]"
        )
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    cls = _digit_classes(classes)
    q = len(cls)
    n_train = check_int(n_train, "n_train", low=q)
    n_test = check_int(n_test, "n_test", low=q)
    eps = check_smoothing(eps)
    data = load_digits()
    mask = np.isin(data.target, cls)
    feats, digits = np.asarray(data.data, dtype=np.float64)[mask], np.asarray(data.target)[mask]
    if n_train + n_test > feats.shape[0]:
        raise ValueError(
            f"n_train + n_test = {n_train + n_test} exceeds the {feats.shape[0]} digits of "
            f"classes {cls}"
        )
    lookup = {c: i for i, c in enumerate(cls)}
    labels = np.array([lookup[int(d)] for d in digits], dtype=np.int64)
    xtr, xte, ltr, lte = train_test_split(
        feats, labels, train_size=n_train, test_size=n_test, stratify=labels, random_state=seed
    )
    mean, std = xtr.mean(axis=0), xtr.std(axis=0)
    std = np.where(std > 0, std, 1.0)

    def inputs(x: np.ndarray) -> Tensor:
        return torch.from_numpy((x - mean) / std).to(dtype)

    def targets(lab: np.ndarray) -> Tensor:
        return smooth_labels(torch.from_numpy(one_hot(lab, q)), eps).to(dtype)

    return DigitsProblem(
        x_train=inputs(xtr), y_train=targets(ltr), labels_train=torch.from_numpy(ltr),
        x_test=inputs(xte), y_test=targets(lte), labels_test=torch.from_numpy(lte),
        classes=cls, eps=eps,
    )
