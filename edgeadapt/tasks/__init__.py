"""Tasks: real datasets with a fixed, reproducible split and the metric that fits them.

``load_task(name, seed=0, max_train=None, max_test=None) -> Task``. Torch-free: tokenisation
happens in :mod:`edgeadapt.train`.
"""

from edgeadapt.tasks.registry import TASKS, Example, Task, load_task

__all__ = ["TASKS", "Example", "Task", "load_task"]
