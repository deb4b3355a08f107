"""Synthetic task generators and their registry. Knows nothing of models."""

from toylens.data import tasks as _tasks  # noqa: F401  (registers every built-in task)
from toylens.data.base import TASKS, Batch, Task, TaskConfig, make_task, register_task

__all__ = ["TASKS", "Batch", "Task", "TaskConfig", "make_task", "register_task"]
