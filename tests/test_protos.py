"""Generated stubs are what `make protos` produces from protos/ today, and every field is documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos" / "vlsplit" / "v1").glob("*.proto"))


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *map(str, PROTOS)], check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert fresh, "protoc produced nothing"
    for rel in fresh:
        committed = ROOT / rel
        assert committed.is_file(), f"{rel} is missing: run `make protos`"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} is stale: run `make protos`"


def test_every_field_and_rpc_has_a_comment():
    for proto in PROTOS:
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            is_field = re.match(r"\s+(optional |repeated )?[\w.]+ \w+ = \d+;", line)
            is_rpc = re.match(r"\s+rpc \w+", line)
            is_enum_value = re.match(r"\s+[A-Z_]+ = \d+;", line)
            if is_field or is_rpc or is_enum_value:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} has no doc comment: {line.strip()}"
