"""Regenerate the Python gRPC code from proto/ (``python -m serving.protogen``).

The generated modules are committed so that a robot SDK install needs no
protoc. grpc_tools writes absolute imports (``from superbrain.v1 import ...``)
that only work with proto/ on sys.path, so we rewrite them to package-relative
imports. ``tests/test_codegen.py`` runs this into a temp dir and fails when the
committed files are stale.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
PROTO_FILE = "superbrain/v1/superbrain.proto"
OUT_DIR = ROOT / "serving" / "api" / "v1"
GENERATED = ("superbrain_pb2.py", "superbrain_pb2.pyi", "superbrain_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the generated files."""
    import grpc_tools  # dev dependency: only needed to regenerate
    from grpc_tools import protoc

    # The well-known types (google/protobuf/any.proto) ship inside grpcio-tools.
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_DIR / PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "superbrain" / "v1" / name).read_text()
            text = re.sub(r"^from superbrain\.v1 import", "from . import", text, flags=re.M)
            # Register messages under the module's real import path, so that tools
            # that pickle by module name (Ray's object store, Serve's gRPC proxy) work.
            text = text.replace("'superbrain.v1.superbrain_pb2'", "'serving.api.v1.superbrain_pb2'")
            target = out_dir / name
            target.write_text(text)
            written.append(target)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
