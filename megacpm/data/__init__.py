"""The data pipeline: corpus (embedded stdlib sources or text files) -> BPE tokenizer -> cached
tokens -> train/validation document split -> seeded GPT sample streams.

Entry points: ``build_datasets(data_cfg, vocab_size, seq_len, seed)`` and
``get_batch(dataset, start, count)``; ``IndexedDataset`` / ``IndexedDatasetWriter`` read and write
Megatron-LM's .bin/.idx corpora. Every user-facing problem raises ``DataError``.
"""
from megacpm.data.batch import IGNORE_INDEX, Batch, shard_batch
from megacpm.data.build import DataBundle, build_datasets, data_signature
from megacpm.data.chat import SAMPLE_INDEX, ChatDataBundle, ChatDataset
from megacpm.data.errors import DataError
from megacpm.data.gpt_dataset import GPTSampleDataset, get_batch
from megacpm.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from megacpm.data.tokenizer import EOD_ID, EOD_TOKEN

__all__ = [
    "Batch",
    "IGNORE_INDEX",
    "shard_batch",
    "ChatDataBundle",
    "ChatDataset",
    "DataBundle",
    "SAMPLE_INDEX",
    "DataError",
    "EOD_ID",
    "EOD_TOKEN",
    "GPTSampleDataset",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "build_datasets",
    "data_signature",
    "get_batch",
]
