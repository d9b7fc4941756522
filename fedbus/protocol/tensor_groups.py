"""Extra tensors travelling with a model in one tensor section.

Model tensors keep their state_dict names; strategy extras (SCAFFOLD's control
variates, for example) are prefixed with their group and a slash, which never occurs in
a torch state_dict key.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedbus.protocol.codec import Tensor

SEPARATOR = "/"


def join_groups(model: Mapping[str, Tensor], groups: Mapping[str, Mapping[str, Tensor]] | None = None) -> dict[str, Tensor]:
    out = dict(model)
    for group, tensors in (groups or {}).items():
        if SEPARATOR in group or not group:
            raise ValueError(f"bad tensor group name {group!r}")
        for name, value in tensors.items():
            out[f"{group}{SEPARATOR}{name}"] = value
    return out


def split_groups(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    model: dict[str, Tensor] = {}
    groups: dict[str, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        group, sep, rest = name.partition(SEPARATOR)
        if sep:
            groups.setdefault(group, {})[rest] = value
        else:
            model[name] = value
    return model, groups
