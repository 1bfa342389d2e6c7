"""Offline models and datasets for qpeft's CLI and examples (no hub access needed).

Models (:mod:`qpeft.assets.models`): ``load_model(name, *, num_labels=None, dtype=torch.float32)
-> LoadedModel`` for ``MODEL_NAMES``. Data (:mod:`qpeft.assets.datasets`): ``load_task(name, *,
seed=0, eval_fraction=0.2, max_train=None, max_eval=None) -> TaskData`` for ``TASK_NAMES`` and
``load_table(train_file, *, text_column, label_column, eval_file=None, seed=0, eval_fraction=0.2)``
for the user's CSV/TSV/JSONL. Batching (:mod:`qpeft.assets.collate`): ``text_batch``,
``lm_blocks``, ``image_batch``. Every missing/unusable asset raises :class:`AssetError` (a
``ValueError``) saying what is missing and how to fix it.
"""

from qpeft.assets._errors import AssetError
from qpeft.assets.collate import IMAGE_MEAN, IMAGE_STD, image_batch, lm_blocks, text_batch
from qpeft.assets.datasets import (
    TASK_NAMES,
    ImageSplit,
    TaskData,
    find_fashion_mnist,
    load_table,
    load_task,
    stratified_split,
    stratified_subsample,
)
from qpeft.assets.efficientnet import EfficientNetLite0, efficientnet_lite0_num_params
from qpeft.assets.models import MODEL_NAMES, LoadedModel, cache_dir, load_model

__all__ = [
    "MODEL_NAMES",
    "TASK_NAMES",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "AssetError",
    "EfficientNetLite0",
    "ImageSplit",
    "LoadedModel",
    "TaskData",
    "cache_dir",
    "efficientnet_lite0_num_params",
    "find_fashion_mnist",
    "image_batch",
    "lm_blocks",
    "load_model",
    "load_table",
    "load_task",
    "stratified_split",
    "stratified_subsample",
    "text_batch",
]
