"""Write the golden wire samples of tests/golden/samples.py as <name>.msgpack files.

    python tests/golden/make_golden.py          # (re)write the files
    python tests/golden/make_golden.py --check  # exit 1 if a file is missing or differs

Regenerating is a deliberate act: a changed file is a wire-format change, so review
the diff, bump SCHEMA_VERSION if old decoders cannot read the new bytes, and commit the
files together with the change.
"""

import argparse
import sys

from samples import SAMPLES, golden_path  # this directory is sys.path[0] when run as a script

from fedmq.schemas import encode


def stale() -> list[str]:
    """Names of samples whose file is missing or differs from ``encode(sample)``."""
    names = []
    for name, sample in SAMPLES.items():
        path = golden_path(name)
        if not path.exists() or path.read_bytes() != encode(sample.message):
            names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    changed = stale()
    if args.check:
        for name in changed:
            print(f"stale: {golden_path(name)}", file=sys.stderr)
        return 1 if changed else 0
    for name, sample in SAMPLES.items():
        payload = encode(sample.message)
        golden_path(name).write_bytes(payload)
        mark = "changed" if name in changed else "same"
        print(f"{golden_path(name)}: {len(payload)} bytes ({mark})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
