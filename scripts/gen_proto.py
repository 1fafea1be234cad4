"""Generate the Python gRPC code for proto/ into clients/generated/, or check that the committed copy is fresh.

    python scripts/gen_proto.py          # regenerate
    python scripts/gen_proto.py --check  # exit 1 if clients/generated/ differs from what proto/ generates

protoc's virtual include path ``-Iclients/generated=proto`` makes the generated modules import each other as
``clients.generated.ddpo.reward.v1...``, so no import rewriting is needed and no top-level ``proto`` package exists.
The output depends on the grpcio-tools version, which pyproject.toml pins for that reason.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE = "clients/generated"


def generate(out_root: Path) -> Path:
    """Write the generated package under ``out_root / PACKAGE`` and return that folder."""
    protos = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE}={PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[f"{PACKAGE}/{p}" for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    package_dir = out_root / PACKAGE
    for folder in [package_dir, *(p for p in package_dir.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return package_dir


def _differences(expected: Path, actual: Path) -> list[str]:
    comparison = filecmp.dircmp(expected, actual, ignore=["__pycache__"])
    found = [f"missing: {n}" for n in comparison.left_only] + [f"unexpected: {n}" for n in comparison.right_only]
    found += [f"stale: {n}" for n in filecmp.cmpfiles(expected, actual, comparison.common_files, shallow=False)[1]]
    for sub in comparison.common_dirs:
        found += [f"{sub}/{d}" for d in _differences(expected / sub, actual / sub)]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare with the committed code")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        target = ROOT / PACKAGE
        if args.check:
            stale = _differences(fresh, target) if target.exists() else ["clients/generated/ is missing"]
            if stale:
                print("clients/generated/ is out of date with proto/; run `python scripts/gen_proto.py`:")
                print("\n".join(f"  {s}" for s in stale))
                return 1
            print("clients/generated/ is up to date")
            return 0
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(fresh, target)
    print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
