"""Tasks and data: labelled examples in deterministic train / dev / test splits."""

from . import squad as _squad  # noqa: F401  (registers the generation task)
from .loaders import Columns, DataError, Example
from .prompts import Prompt
from .tasks import TASKS, TaskData, get_task, list_tasks, register_task

__all__ = ["TASKS", "Columns", "DataError", "Example", "Prompt", "TaskData", "get_task", "list_tasks", "register_task"]
