"""Synthetic task generators and their registry. Knows nothing of models."""

from toylens.data import tasks as _tasks  # noqa: F401  (registers every built-in task)
from toylens.data.base import TASKS, Batch, Task, TaskConfig, register_task
from toylens.data.registry import TaskRefError, make_task, task_class, task_config

__all__ = ["TASKS", "Batch", "Task", "TaskConfig", "TaskRefError", "make_task", "register_task", "task_class",
           "task_config"]
