import sys

from cdiff.cli import main

sys.exit(main())
