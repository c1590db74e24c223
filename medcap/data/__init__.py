"""Data sets: readers for the ImageCLEF/ROCO layout, CSV/JSONL manifests and HF ``datasets``; validation.

``load_split`` reads one split into ``Example`` records (every problem reported with its file and
line), ``check_dataset`` validates a whole data set, ``load_image`` decodes an example's image.
"""

from medcap.data.load import (
    SplitData,
    check_dataset,
    list_splits,
    load_image,
    load_split,
    unreferenced_images,
    write_rejects,
)
from medcap.data.problems import InputError, Problem

__all__ = [
    "InputError",
    "Problem",
    "SplitData",
    "check_dataset",
    "list_splits",
    "load_image",
    "load_split",
    "unreferenced_images",
    "write_rejects",
]
