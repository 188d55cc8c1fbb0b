"""Tasks, prompt templates, client partitioning and tokenisation."""

from fedkt.data.tasks import DataError, Example, load_jsonl, load_task
from fedkt.data.partition import partition, split_aux

__all__ = ["DataError", "Example", "load_jsonl", "load_task", "partition", "split_aux"]
