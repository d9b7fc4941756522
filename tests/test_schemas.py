"""schemas/ must always match the pydantic models it is generated from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedbus.protocol import schemas
from fedbus.protocol.messages import MESSAGE_TYPES

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"


def test_schemas_dir_matches_models():
    problems = schemas.check(SCHEMAS)
    assert problems == [], (
        f"schemas/ is out of date with the pydantic models: {problems}; "
        "regenerate with `python -m fedbus.protocol.schemas` and commit the result"
    )


def test_default_dir_is_project_schemas():
    assert schemas.DEFAULT_DIR == SCHEMAS


def test_every_model_has_a_schema_with_id_and_title():
    generated = schemas.generate()
    expected = {"envelope-header.schema.json", "job-spec.schema.json", "federation.schema.json",
                "audit-record.schema.json"}
    expected |= {f"message.{t}.schema.json" for t in MESSAGE_TYPES}
    assert set(generated) == expected
    ids = set()
    for name, schema in generated.items():
        assert schema["$id"].startswith(schemas.ID_PREFIX)
        assert schema["title"]
        ids.add(schema["$id"])
    assert len(ids) == len(generated)
    for msg_type, cls in MESSAGE_TYPES.items():
        schema = generated[f"message.{msg_type}.schema.json"]
        assert schema["x-fedbus-type"] == msg_type
        assert schema["x-fedbus-sender-roles"] == sorted(cls.SENDER_ROLES)
        assert schema["additionalProperties"] is False


def test_output_is_deterministic_and_formatted(tmp_path):
    first = {p.name: p.read_bytes() for p in schemas.write(tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in schemas.write(tmp_path / "b")}
    assert first == second
    for name, data in first.items():
        text = data.decode("utf-8")
        assert text.endswith("}\n") and not text.endswith("\n\n"), name
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n", name


def test_check_detects_a_modified_file(tmp_path):
    copy = tmp_path / "schemas"
    schemas.write(copy)
    assert schemas.check(copy) == []
    target = copy / "message.update.schema.json"
    data = json.loads(target.read_text())
    data["properties"]["num_samples"]["minimum"] = 0
    target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    assert schemas.check(copy) == ["message.update.schema.json"]
    # Whitespace-only drift counts too: the files are generated, byte for byte.
    header = copy / "job-spec.schema.json"
    header.write_bytes(header.read_bytes().replace(b"\n", b"\r\n"))
    assert schemas.check(copy) == ["job-spec.schema.json", "message.update.schema.json"]
    schemas.write(copy)
    assert schemas.check(copy) == []


def test_check_detects_missing_and_stale_files(tmp_path):
    copy = tmp_path / "schemas"
    schemas.write(copy)
    (copy / "federation.schema.json").unlink()
    stale = copy / "message.dropped-type.schema.json"
    stale.write_text("{}\n")
    renamed = copy / "old-name.schema.json"  # not our name pattern, but our $id
    renamed.write_text(json.dumps({"$id": schemas.ID_PREFIX + "old-name"}) + "\n")
    foreign = copy / "someone-else.schema.json"
    foreign.write_text(json.dumps({"$id": "https://example.org/x"}) + "\n")
    unrelated = copy / "README.md"
    unrelated.write_text("hand written\n")
    assert schemas.check(copy) == sorted(
        ["federation.schema.json", "message.dropped-type.schema.json", "old-name.schema.json"])
    schemas.write(copy)
    assert schemas.check(copy) == []
    assert not stale.exists() and not renamed.exists()
    assert foreign.exists() and unrelated.exists()


def test_check_on_missing_directory_lists_everything(tmp_path):
    assert schemas.check(tmp_path / "nope") == sorted(schemas.generate())


def test_cli_check_and_write(tmp_path):
    out: list[str] = []
    assert schemas.main(["--check", str(tmp_path)], out=out.append) == 1
    assert schemas.main([str(tmp_path)], out=out.append) == 0
    assert schemas.main(["--check", str(tmp_path)], out=out.append) == 0


@pytest.mark.timeout(60)
def test_module_runs_as_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedbus.protocol.schemas", "--check", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert "out of date" in proc.stdout
