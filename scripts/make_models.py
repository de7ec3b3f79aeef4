#!/usr/bin/env python3
"""Write models into a folder.

  make_models.py OUTDIR [tiny small big meta ...]   small generated GGUF models (random weights)
  make_models.py --real NAME... OUTDIR [--store]    real trained models (see real_models.py)
"""

import sys

from ollamad.models.testmodels import SPECS, write_all


def main() -> None:
    if sys.argv[1:2] == ["--real"]:
        from real_models import main as real_main

        sys.exit(real_main(sys.argv[2:]))
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} OUTDIR [{' '.join(SPECS)} meta]\n"
                 f"       {sys.argv[0]} --real NAME... OUTDIR [--store]")
    which = tuple(sys.argv[2:]) or ("tiny",)
    for path in write_all(sys.argv[1], which):
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
