"""Prebuild the CUDA extension: ``python -m fastvit.build [--verbose]``.

Compiles csrc/ for ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0a"``) into ``$TORCH_EXTENSIONS_DIR``, loads
it to check that it links, and prints where it is. Exits 1 with the reason when it cannot build.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvit.build", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    from fastvit import _ext

    start = time.perf_counter()
    try:
        _ext.build(verbose=args.verbose)
        lib = _ext.load()
    except _ext.ExtensionError as e:
        print(f"fastvit.build: {e}", file=sys.stderr)
        return 1
    print(f"fastvit.build: {lib} ({time.perf_counter() - start:.0f} s; archs {';'.join(_ext.arch_list())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
