"""The committed stubs in rstar/v1 must be what protoc generates from proto/ now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stubs_are_fresh(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto/rstar/v1").glob("*.proto"))
    assert protos, "no .proto files"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos], cwd=ROOT, check=True)
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "rstar/v1").iterdir())
    assert generated
    stale = [str(g) for g in generated if (ROOT / g).read_bytes() != (tmp_path / g).read_bytes()]
    assert not stale, f"stale stubs (run `make protos` and commit): {stale}"
