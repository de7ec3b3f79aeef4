#!/usr/bin/env python3
"""Write small generated GGUF models: make_models.py OUTDIR [tiny small big meta]."""

import sys

from ollamad.models.testmodels import SPECS, write_all


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} OUTDIR [{' '.join(SPECS)} meta]")
    which = tuple(sys.argv[2:]) or ("tiny",)
    for path in write_all(sys.argv[1], which):
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
