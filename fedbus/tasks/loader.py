"""Finding a task from the reference written in a job spec.

A reference is "module:attr", where module is a dotted import path
("fedbus.tasks.digits") or a path to a .py file ("./my_task.py"), and attr is a
(possibly dotted) name in it. The object found may be a Task instance, a Task
subclass (instantiated with no arguments) or a zero-argument factory returning a Task.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from fedbus.tasks.base import Task


class TaskLoadError(Exception):
    """A task reference could not be turned into a Task."""


def load_task(ref: str) -> Task:
    module_part, attr_part = _split_ref(ref)
    module = _import_module(module_part, ref)
    obj = _get_attr(module, attr_part, ref)
    return _to_task(obj, ref)


def _split_ref(ref: str) -> tuple[str, str]:
    # rpartition, so a Windows drive letter ("C:\\x\\task.py:task") stays in the module part.
    module_part, sep, attr_part = ref.strip().rpartition(":")
    if not sep or not module_part or not attr_part:
        raise TaskLoadError(
            f"task reference {ref!r} is not of the form 'package.module:attr' or 'path/to/file.py:attr'"
        )
    return module_part, attr_part


def _import_module(module_part: str, ref: str) -> ModuleType:
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        return _import_file(Path(module_part), ref)
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        # Tell apart "the task module does not exist" from "it exists but imports something missing".
        if exc.name is not None and (module_part == exc.name or module_part.startswith(exc.name + ".")):
            raise TaskLoadError(
                f"task module {module_part!r} not found (from {ref!r}); is it installed or on PYTHONPATH?"
            ) from exc
        raise TaskLoadError(f"task module {module_part!r} failed to import: {exc}") from exc
    except Exception as exc:
        raise TaskLoadError(f"task module {module_part!r} failed to import: {type(exc).__name__}: {exc}") from exc


def _import_file(path: Path, ref: str) -> ModuleType:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise TaskLoadError(f"task file {str(path)!r} not found (from {ref!r})")
    # A unique, stable name per file: two task files called task.py must not collide.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_name = f"fedbus_user_task_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TaskLoadError(f"cannot import {str(path)!r} as a Python module (from {ref!r})")
    module = importlib.util.module_from_spec(spec)
    # Registered before executing, as dataclasses and pickling look modules up by name.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise TaskLoadError(f"task file {str(path)!r} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def _get_attr(module: ModuleType, attr_part: str, ref: str) -> Any:
    obj: Any = module
    for name in attr_part.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            candidates = ", ".join(_task_like_names(module)) or "none"
            raise TaskLoadError(
                f"{module.__name__!r} has no attribute {attr_part!r} (from {ref!r}); "
                f"task-like names in it: {candidates}"
            ) from None
    return obj


def _task_like_names(module: ModuleType) -> list[str]:
    names = []
    for name, value in vars(module).items():
        if isinstance(value, Task) or (inspect.isclass(value) and issubclass(value, Task) and value is not Task):
            names.append(name)
    return sorted(names)


def _to_task(obj: Any, ref: str) -> Task:
    if isinstance(obj, Task):
        return obj
    if inspect.isclass(obj) and not issubclass(obj, Task):
        raise TaskLoadError(f"{ref!r} is the class {obj.__qualname__}, which does not subclass fedbus.tasks.Task")
    if not callable(obj):
        raise TaskLoadError(
            f"{ref!r} is of type {type(obj).__name__}; expected a Task instance, a Task subclass "
            "or a zero-argument function returning a Task"
        )
    what = "class" if inspect.isclass(obj) else "factory"
    try:
        made = obj()
    except TypeError as exc:
        raise TaskLoadError(f"{ref!r}: calling the {what} with no arguments failed: {exc}") from exc
    except Exception as exc:
        raise TaskLoadError(f"{ref!r}: the {what} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(made, Task):
        raise TaskLoadError(
            f"{ref!r}: the factory returned a {type(made).__name__}, not a fedbus.tasks.Task"
        )
    return made
