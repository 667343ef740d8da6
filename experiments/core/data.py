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
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Dataset:
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int = NUM_CLASSES


def idx_directory(data_config) -> pathlib.Path:
  """Where the IDX files of (fashion_)mnist are: `data.path`, or Debian's package location."""
  if data_config.path:
    return pathlib.Path(data_config.path)
  if data_config.name == "fashion_mnist":
    return pathlib.Path(FASHION_MNIST_DIR)
  raise ValueError("config.data.path: MNIST needs the directory of its IDX .gz files.")


class DataError(ValueError):
  """Data files that cannot be used as they are: the message names the files."""


@dataclasses.dataclass(frozen=True)
class DataShape:
  """What a config's data will be, known without generating or reading all of it."""

  num_train: int
  num_test: int
  example_shape: tuple[int, ...]


def check_available(data_config) -> None:
  """Raises (before any work) if the configured data cannot be loaded: missing IDX files,
  or files that do not belong together (image and label counts, image sizes, labels)."""
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
  _check_idx(directory)


def shape_of(data_config) -> DataShape:
  """Split sizes and example shape of the configured data; raises as `check_available`."""
  check_available(data_config)
  if data_config.name == "mnist1d":
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    # make_dataset draws num_samples // 10 examples per class, then splits by train_split.
    total = data_config.num_samples // 10 * 10
    num_train = int(total * args.train_split)
    return DataShape(num_train, total - num_train, (args.final_seq_length,))
  if data_config.name == "synthetic":
    return DataShape(data_config.num_samples, _synthetic_test_size(data_config.num_samples),
                     tuple(data_config.synthetic_shape))
  directory = idx_directory(data_config)
  images = _idx_header(directory / IDX_FILES["x_train"])
  tests = _idx_header(directory / IDX_FILES["x_test"])
  return DataShape(images[0], tests[0], (*images[1:], 1))


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


def _idx_header(path: pathlib.Path) -> tuple[int, ...]:
  """The dimensions an IDX file declares (the first is the number of items), read from its
  first bytes only."""
  try:
    with gzip.open(path, "rb") as f:
      magic = f.read(4)
      if len(magic) < 4 or magic[:3] != b"\0\0\x08":
        raise DataError(f"config.data.path: {path} is not an IDX file of unsigned bytes "
                        f"(it starts with {magic.hex() or 'nothing'}, not 000008).")
      raw = f.read(4 * magic[3])
  except (OSError, EOFError) as error:  # not gzip, or cut short
    raise DataError(f"config.data.path: {path} cannot be read as a gzipped IDX file "
                    f"({error}).") from None
  if len(raw) < 4 * magic[3]:
    raise DataError(f"config.data.path: {path} ends inside its header (truncated).")
  return tuple(int.from_bytes(raw[4 * i: 4 + 4 * i], "big") for i in range(magic[3]))


def _check_idx(directory: pathlib.Path) -> None:
  """Images and labels must pair up one to one: with more images than labels, JAX would
  clamp the missing labels' indices and train on wrong labels without a word."""
  headers = {k: _idx_header(directory / f) for k, f in IDX_FILES.items()}
  for split in ("train", "test"):
    x_file, y_file = IDX_FILES[f"x_{split}"], IDX_FILES[f"y_{split}"]
    images, labels = headers[f"x_{split}"], headers[f"y_{split}"]
    if len(images) != 3 or len(labels) != 1:
      raise DataError(f"config.data.path: {directory / x_file} must hold images (3 "
                      f"dimensions, has {len(images)}) and {directory / y_file} labels (1 "
                      f"dimension, has {len(labels)}).")
    if images[0] != labels[0]:
      raise DataError(f"config.data.path: {directory / x_file} holds {images[0]} images but "
                      f"{directory / y_file} holds {labels[0]} labels; each image needs "
                      "exactly one label.")
    found = _read_idx(directory / y_file)
    if found.size and found.max() >= NUM_CLASSES:
      raise DataError(f"config.data.path: {directory / y_file} holds label {found.max()}; "
                      f"labels must be 0 to {NUM_CLASSES - 1}.")
  if headers["x_train"][1:] != headers["x_test"][1:]:
    raise DataError(f"config.data.path: {directory / IDX_FILES['x_train']} holds "
                    f"{'x'.join(map(str, headers['x_train'][1:]))} images but "
                    f"{directory / IDX_FILES['x_test']} "
                    f"{'x'.join(map(str, headers['x_test'][1:]))} ones.")


def _read_idx(path: pathlib.Path) -> np.ndarray:
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as error:
    raise DataError(f"config.data.path: {path} cannot be read as a gzipped IDX file "
                    f"({error}).") from None
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  if len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
    raise DataError(f"config.data.path: {path} declares {'x'.join(map(str, shape))} bytes of "
                    f"data but holds {len(raw) - 4 - 4 * ndim} (truncated or padded).")
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
  x_test, y_test = split(_synthetic_test_size(data_config.num_samples))
  return Dataset(x_train, y_train, x_test, y_test)


def _synthetic_test_size(num_samples: int) -> int:
  return max(num_samples // 4, 10)
