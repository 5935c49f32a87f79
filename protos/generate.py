"""Regenerate the Python gRPC stubs from the .proto files, reproducibly.

    python protos/generate.py          # rewrite the committed stubs
    python protos/generate.py --check  # exit 1 if the committed stubs are stale

protoc runs in-process (grpc_tools) with the repository root as the only include path for our
files, so the proto is compiled as `protos/qwen2_serve/v1/qwen2_serve.proto` and the generated
`_pb2_grpc.py` imports `from protos.qwen2_serve.v1 import qwen2_serve_pb2`: an absolute import
that works for anyone who can import `protos`, without sys.path tricks or editing generated code.

The output depends only on the .proto and on the grpcio-tools version (its version is written into
the stubs); tests/unit/test_protos.py checks the committed stubs against a fresh generation.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Relative to REPO_ROOT; the relative path is what protoc records and turns into import paths.
PROTO_FILES = ("protos/qwen2_serve/v1/qwen2_serve.proto",)


def generated_paths(proto: str) -> list[str]:
    """The stub files protoc writes for one .proto, relative to the output root."""
    stem = proto.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(out_root: Path, repo_root: Path = REPO_ROOT) -> list[Path]:
    """Compile every proto in PROTO_FILES into out_root (mirroring the repo layout).

    Returns the written files. Raises RuntimeError when protoc fails.
    """
    # Imported here so that importing this module (e.g. for PROTO_FILES) needs no grpc_tools.
    from grpc_tools import protoc

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    # The well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{repo_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        # Absolute path under -I<root>: protoc maps it back to the relative name.
        *[str(repo_root / p) for p in PROTO_FILES],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    return [out_root / g for p in PROTO_FILES for g in generated_paths(p)]


def stale_files(repo_root: Path = REPO_ROOT) -> list[str]:
    """Committed stubs that differ from (or are missing next to) a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), repo_root)
        stale = []
        for p in PROTO_FILES:
            for g in generated_paths(p):
                committed = repo_root / g
                if not committed.exists() or not filecmp.cmp(Path(tmp) / g, committed, shallow=False):
                    stale.append(g)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for g in stale:
            print(f"stale: {g} (run: python protos/generate.py)", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(REPO_ROOT):
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
