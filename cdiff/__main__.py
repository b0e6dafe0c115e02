"""``python -m cdiff``: the same command as ``cdiff`` (cdiff.cli)."""

import sys

from cdiff.cli import main

if __name__ == "__main__":
    sys.exit(main())
