"""Datasets, all local: MNIST-1D generated offline, (Fashion-)MNIST from IDX files, synthetic.

Every loader returns a `Dataset` of NumPy arrays: images as (N, H, W, 1) float32 in [0, 1],
MNIST-1D as (N, 40) standardized signals, labels as int32.
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
NAMES = ("mnist1d", "fashion_mnist", "mnist", "synthetic")


@dataclasses.dataclass(frozen=True)
class Dataset:
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int = 10


def idx_directory(data_config) -> pathlib.Path:
  """Where the IDX files of (fashion_)mnist are: `data.path`, or Debian's package location."""
  if data_config.path:
    return pathlib.Path(data_config.path)
  if data_config.name == "fashion_mnist":
    return pathlib.Path(FASHION_MNIST_DIR)
  raise ValueError("config.data.path: MNIST needs the directory of its IDX .gz files.")


def check_available(data_config) -> None:
  """Raises (before any work) if the configured data cannot be loaded."""
  if data_config.name not in ("fashion_mnist", "mnist"):
    return
  directory = idx_directory(data_config)
  missing = [f for f in IDX_FILES.values() if not (directory / f).is_file()]
  if missing:
    hint = ("install Debian's package: apt-get update && apt-get install -y "
            "dataset-fashion-mnist" if data_config.name == "fashion_mnist" else
            "download the four MNIST IDX .gz files into it")
    raise FileNotFoundError(
        f"config.data.path: {directory} lacks {', '.join(missing)}; {hint}, or set "
        "--config.data.path to a directory holding the standard IDX .gz files.")


def load(data_config, seed: int) -> Dataset:
  check_available(data_config)
  if data_config.name == "mnist1d":
    return _mnist1d(data_config.num_samples, seed)
  if data_config.name in ("fashion_mnist", "mnist"):
    return _idx(idx_directory(data_config))
  return _synthetic(data_config, seed)


def _mnist1d(num_samples: int, seed: int) -> Dataset:
  # Generated offline by the package (its get_dataset would try to download first).
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()
  args.num_samples = num_samples
  args.seed = 42 + seed  # 42 is the published dataset
  data = make_dataset(args)
  return Dataset(data["x"].astype(np.float32), data["y"].astype(np.int32),
                 data["x_test"].astype(np.float32), data["y_test"].astype(np.int32))


def _read_idx(path: pathlib.Path) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx(directory: pathlib.Path) -> Dataset:
  arrays = {k: _read_idx(directory / f) for k, f in IDX_FILES.items()}
  images = lambda a: (a.astype(np.float32) / 255.0)[..., None]
  return Dataset(images(arrays["x_train"]), arrays["y_train"].astype(np.int32),
                 images(arrays["x_test"]), arrays["y_test"].astype(np.int32))


def _synthetic(data_config, seed: int) -> Dataset:
  """Ten Gaussian classes around fixed random centres: learnable, tiny, for tests only."""
  rng = np.random.default_rng(seed)
  shape = tuple(data_config.synthetic_shape)
  centres = rng.standard_normal((10, *shape)).astype(np.float32)

  def split(n):
    y = rng.integers(0, 10, n).astype(np.int32)
    x = centres[y] + 0.5 * rng.standard_normal((n, *shape)).astype(np.float32)
    return x, y

  x_train, y_train = split(data_config.num_samples)
  x_test, y_test = split(max(data_config.num_samples // 4, 10))
  return Dataset(x_train, y_train, x_test, y_test)
