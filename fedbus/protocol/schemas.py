"""JSON Schemas of the wire and configuration formats, generated from the pydantic models.

The pydantic models are the single source of truth; ``schemas/`` at the project root holds
their JSON Schema rendering for people and tools outside Python. ``tests/test_schemas.py``
fails when the two drift apart. Regenerate with::

    python -m fedbus.protocol.schemas            # write schemas/
    python -m fedbus.protocol.schemas --check    # exit 1 if schemas/ is out of date

Files written here (and only those) are owned by this module: ``write`` removes an owned
file that no model produces any more (e.g. a message type that was dropped), and leaves
every other file in the directory alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fedbus.crypto.federation import FederationFile
from fedbus.protocol.audit import AUDIT_TYPE, AuditRecord
from fedbus.protocol.envelope import PROTOCOL_VERSION, EnvelopeHeader
from fedbus.jobspec import JobSpec
from fedbus.protocol.messages import MESSAGE_TYPES

SUFFIX = ".schema.json"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = f"urn:fedbus:v{PROTOCOL_VERSION}:schema:"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "schemas"

# Names this module may write; anything matching is ours to delete when stale.
_FIXED_FILES = ("envelope-header", "job-spec", "federation", "audit-record")
_OWNED_NAME = re.compile(r"^(?:envelope-header|job-spec|federation|audit-record|message\.[A-Za-z0-9_.-]+)\.schema\.json$")


def _schema(model: type[BaseModel], stem: str, title: str, **extra: Any) -> dict:
    schema = model.model_json_schema(mode="validation")
    schema["$schema"] = JSON_SCHEMA_DIALECT
    schema["$id"] = ID_PREFIX + stem
    schema["title"] = title
    schema.update(extra)
    return schema


def generate() -> dict[str, dict]:
    """File name -> JSON Schema for every model that crosses a process boundary."""
    out: dict[str, dict] = {}
    out["envelope-header" + SUFFIX] = _schema(
        EnvelopeHeader, "envelope-header", "fedbus envelope header",
        **{"x-fedbus-protocol-version": PROTOCOL_VERSION},
    )
    for msg_type, cls in sorted(MESSAGE_TYPES.items()):
        stem = f"message.{msg_type}"
        out[stem + SUFFIX] = _schema(
            cls, stem, f"fedbus message body: {msg_type}",
            **{
                "x-fedbus-type": msg_type,
                "x-fedbus-sender-roles": sorted(cls.SENDER_ROLES),
                "x-fedbus-has-tensors": cls.HAS_TENSORS,
                "x-fedbus-protocol-version": PROTOCOL_VERSION,
            },
        )
    out["job-spec" + SUFFIX] = _schema(JobSpec, "job-spec", "fedbus job spec")
    out["federation" + SUFFIX] = _schema(FederationFile, "federation", "fedbus federation file")
    out["audit-record" + SUFFIX] = _schema(AuditRecord, "audit-record", "fedbus audit record",
                                           **{"x-fedbus-type": AUDIT_TYPE})
    return out


def render(schema: dict) -> str:
    """The exact text written for a schema: deterministic for the same models."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _is_owned(path: Path) -> bool:
    if _OWNED_NAME.match(path.name):
        return True
    try:  # a renamed file of ours still carries our $id
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("$id", "")).startswith(ID_PREFIX)


def _stale(directory: Path, expected: dict[str, str]) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*" + SUFFIX)
                  if p.name not in expected and p.is_file() and _is_owned(p))


def _expected() -> dict[str, str]:
    return {name: render(schema) for name, schema in generate().items()}


def write(directory: str | Path = DEFAULT_DIR) -> list[Path]:
    """Write every schema into ``directory`` and remove stale owned ones; returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected = _expected()
    for path in _stale(directory, expected):
        path.unlink()
    written = []
    for name, text in sorted(expected.items()):
        path = directory / name
        # Leave unchanged files untouched (keeps mtimes stable for build tools).
        data = text.encode("utf-8")
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
        written.append(path)
    return written


def check(directory: str | Path = DEFAULT_DIR) -> list[str]:
    """Names of files that are missing, differ from the models, or are stale; [] when up to date."""
    directory = Path(directory)
    expected = _expected()
    problems = []
    for name, text in expected.items():
        path = directory / name
        try:
            current = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            current = None
        if current != text:
            problems.append(name)
    problems.extend(p.name for p in _stale(directory, expected))
    return sorted(problems)


def main(argv: list[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedbus.protocol.schemas",
                                     description="Generate (or check) fedbus JSON Schemas from the pydantic models.")
    parser.add_argument("--check", action="store_true", help="report out-of-date files and exit 1 instead of writing")
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR,
                        help=f"output directory (default: {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.directory)
        for name in problems:
            out(f"out of date: {args.directory / name}")
        if problems:
            out("run `python -m fedbus.protocol.schemas` to regenerate")
            return 1
        out(f"{args.directory}: up to date")
        return 0
    for path in write(args.directory):
        out(str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
