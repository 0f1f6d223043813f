import sys

from aic_core.cli import main

sys.exit(main())
