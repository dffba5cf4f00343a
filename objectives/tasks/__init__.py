"""Tasks: a source and a target domain of labelled images, split for transfer."""

from .base import DomainPool, LabeledImages, TaskData, TaskInfo, TaskOptions, get_task_info, list_tasks, register_task
from .folder import FolderImages, Images
from .split import load_task, split_task

__all__ = ["DomainPool", "FolderImages", "Images", "LabeledImages", "TaskData", "TaskInfo", "TaskOptions",
           "get_task_info", "list_tasks", "load_task", "register_task", "split_task"]
