"""Task plugins: the model, each worker's data, and local train/evaluate.

`fedbus.tasks.digits` (the built-in task) is not imported here, so importing the
API does not import scikit-learn; `load_task("fedbus.tasks.digits:task")` loads it.
"""

from fedbus.tasks.base import (
    EvalResult,
    Task,
    TaskParamsError,
    TrainResult,
    TrainSettings,
    WorkerData,
    parse_task_params,
    warm_up_torch,
)
from fedbus.tasks.loader import TaskLoadError, load_task
from fedbus.tasks.partition import dirichlet_partition, iid_partition

__all__ = [
    "EvalResult",
    "Task",
    "TaskLoadError",
    "TaskParamsError",
    "TrainResult",
    "TrainSettings",
    "WorkerData",
    "dirichlet_partition",
    "iid_partition",
    "load_task",
    "parse_task_params",
    "warm_up_torch",
]
