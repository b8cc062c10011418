"""Data: built-in sets, file loaders, splits, Dataset / PoisonedDataset."""
from safedl.data.builtin import BUILTIN, load_builtin
from safedl.data.dataset import Dataset, PoisonedDataset, Splits
from safedl.data.loaders import load_cifar10, load_idx, load_image_folder, load_npz
from safedl.data.split import stratified_split

__all__ = ["BUILTIN", "Dataset", "PoisonedDataset", "Splits", "load_builtin", "load_cifar10", "load_idx",
           "load_image_folder", "load_npz", "stratified_split"]
