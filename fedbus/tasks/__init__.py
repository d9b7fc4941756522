"""Task plugins: the model, each worker's data, and local train/evaluate.

`fedbus.tasks.digits` (the built-in task) is not imported here;
`load_task("fedbus.tasks.digits:task")` loads it. Neither the API nor the digits task
imports scikit-learn or torch.optim (and with it torch._dynamo): see
`fedbus.tasks.optim` and `fedbus.tasks.digits.load_arrays`.
"""

from fedbus.tasks.base import (
    EvalResult,
    Task,
    TaskParamsError,
    TrainResult,
    TrainingContext,
    TrainSettings,
    WorkerData,
    call_evaluate,
    call_train,
    derive_seed,
    training_context,
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
    "TrainingContext",
    "call_evaluate",
    "call_train",
    "derive_seed",
    "training_context",
    "WorkerData",
    "dirichlet_partition",
    "iid_partition",
    "load_task",
    "parse_task_params",
    "warm_up_torch",
]
