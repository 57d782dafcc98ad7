"""Former home of the Tux Paint demo-data preparation, now ``demo/tuxpaint.py`` (demo data is not
part of the library). ``python -m extract.tuxpaint ARGS`` still works from the repository root: it
says where the script went and runs it with the same arguments."""

from __future__ import annotations

import importlib.util
import runpy
import sys

MOVED_TO = "demo.tuxpaint"


def main() -> None:
    print(f"note: `python -m extract.tuxpaint` moved to `python -m {MOVED_TO}` (or `make demo`); running that.",
          file=sys.stderr)
    try:
        found = importlib.util.find_spec(MOVED_TO) is not None
    except ModuleNotFoundError:  # no `demo` package on the path
        found = False
    if not found:
        sys.exit(f"Error: {MOVED_TO} is not importable here: run `python -m {MOVED_TO} ...` from the "
                 "repository root (it is not installed with the package), or `make demo`.")
    runpy.run_module(MOVED_TO, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
