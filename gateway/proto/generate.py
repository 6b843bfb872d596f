"""Regenerate the committed gRPC stubs from gateway/tandem.proto.

    .venv/bin/python -m tandem.gateway.proto.generate

The stubs are committed so that a gateway image needs no grpcio-tools; a test
regenerates them into a temporary folder and fails when the committed ones are stale.
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO = Path(__file__).resolve().parent.parent / "tandem.proto"
OUT_DIR = Path(__file__).resolve().parent
STUBS = ("tandem_pb2.py", "tandem_pb2_grpc.py", "tandem_pb2.pyi")

# protoc writes a top-level import; the stubs live in a package.
_BARE_IMPORT = "import tandem_pb2 as tandem__pb2"
_PACKAGE_IMPORT = "from tandem.gateway.proto import tandem_pb2 as tandem__pb2"


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Write the stubs into out_dir and return their paths."""
    from grpc_tools import protoc  # dev-only dependency, so imported on use

    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in STUBS:
            text = (Path(tmp) / name).read_text()
            if name == "tandem_pb2_grpc.py":
                if _BARE_IMPORT not in text:
                    raise RuntimeError("protoc output changed: import line not found")
                text = text.replace(_BARE_IMPORT, _PACKAGE_IMPORT)
            (out_dir / name).write_text(text)
            written.append(out_dir / name)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(path)
