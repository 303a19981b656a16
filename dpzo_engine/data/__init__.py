"""Tasks and data: labelled examples in deterministic train / dev / test splits."""

from .loaders import Columns, DataError, Example
from .tasks import TASKS, Prompt, TaskData, get_task, list_tasks, register_task

__all__ = ["TASKS", "Columns", "DataError", "Example", "Prompt", "TaskData", "get_task", "list_tasks", "register_task"]
