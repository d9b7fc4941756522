"""load_task: the three accepted forms, file paths, and each kind of failure."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedbus.tasks import Task, TaskLoadError, TrainSettings, load_task

TESTS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = TESTS_DIR.parent
# "tests.example_task" must be importable however pytest was started.
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("attr", ["task", "LinearTask", "make_task"])
def test_loads_instance_class_and_factory(attr):
    task = load_task(f"tests.example_task:{attr}")
    assert isinstance(task, Task)
    assert task.name == "example-linear"


def test_loads_from_file_path():
    task = load_task(f"{TESTS_DIR / 'example_task.py'}:task")
    assert task.name == "example-linear"
    # Loading the same file again reuses the module rather than re-executing it.
    again = load_task(f"{TESTS_DIR / 'example_task.py'}:task")
    assert type(again) is type(task)


def test_loads_builtin_digits_task():
    task = load_task("fedbus.tasks.digits:task")
    assert task.name == "digits"


def test_user_task_trains_and_evaluates_with_default_loop():
    task = load_task("tests.example_task:task")
    torch.manual_seed(0)
    model = task.build_model({})
    data = task.worker_data(partition=0, num_partitions=2, params={"samples_per_worker": 256}, seed=0)
    before = task.evaluate(model, data.val)
    settings = TrainSettings(epochs=10, batch_size=32, lr=0.1)
    result = task.train(model, data.train, settings, seed=1)
    after = task.evaluate(model, data.val)
    assert result.num_samples == 256
    assert result.num_steps == 10 * 8
    assert set(result.metrics) >= {"loss", "accuracy"}
    assert after.num_samples == 64
    assert after.loss < before.loss
    assert after.accuracy > 0.9


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("tests.example_task", "not of the form"),
        (":task", "not of the form"),
        ("tests.example_task:", "not of the form"),
        ("no_such_package_xyz.tasks:task", "task module 'no_such_package_xyz.tasks' not found"),
        ("tests.example_task:nope", "has no attribute 'nope'"),
        ("tests.example_task:not_a_task", "is of type int"),
        ("tests.example_task:NotATask", "does not subclass fedbus.tasks.Task"),
        ("tests.example_task:make_something_else", "returned a str"),
        ("/no/such/dir/task.py:task", "not found"),
    ],
)
def test_errors_say_what_went_wrong(ref, expected):
    with pytest.raises(TaskLoadError, match=expected.replace("(", r"\(")):
        load_task(ref)


def test_missing_attribute_lists_the_tasks_that_exist():
    with pytest.raises(TaskLoadError) as info:
        load_task("tests.example_task:tsak")
    assert "LinearTask" in str(info.value) and "task" in str(info.value)


def test_missing_dependency_of_an_existing_module_is_not_reported_as_missing_module(tmp_path):
    broken = tmp_path / "broken_task.py"
    broken.write_text("import a_dependency_that_is_not_installed\n")
    with pytest.raises(TaskLoadError, match="a_dependency_that_is_not_installed"):
        load_task(f"{broken}:task")

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(TaskLoadError, match="failed to import.*a_dependency_that_is_not_installed"):
            load_task("broken_task:task")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("broken_task", None)


def test_factory_needing_arguments_is_a_load_error(tmp_path):
    module = tmp_path / "needs_args.py"
    module.write_text(
        "from fedbus.tasks import Task\n"
        "class NeedsArgs(Task):\n"
        "    def __init__(self, size):\n"
        "        self.size = size\n"
    )
    with pytest.raises(TaskLoadError, match="no arguments"):
        load_task(f"{module}:NeedsArgs")
