"""The data registry: named datasets loaded once into normalised tensors on a device, or
image folders streamed from their files."""

from ticketctl.data.augment import augment_batch
from ticketctl.data.dataset import Dataset
from ticketctl.data.registry import DATASETS, load_dataset, load_recorded_dataset
from ticketctl.data.stream import StreamedDataset

__all__ = ["DATASETS", "Dataset", "StreamedDataset", "augment_batch", "load_dataset",
           "load_recorded_dataset"]
