"""The data registry: named datasets loaded once into normalised tensors on a device."""

from ticketctl.data.augment import augment_batch
from ticketctl.data.dataset import Dataset
from ticketctl.data.registry import DATASETS, load_dataset, load_recorded_dataset

__all__ = ["DATASETS", "Dataset", "augment_batch", "load_dataset", "load_recorded_dataset"]
