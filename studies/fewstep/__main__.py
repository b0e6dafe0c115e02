import sys

from studies.fewstep.report import main

sys.exit(main())
