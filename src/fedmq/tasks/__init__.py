"""Tasks: what a federation learns (``fedmq.Task``), and the pure machinery around them."""

from fedmq.tasks.task import Task

__all__ = ["Task"]
