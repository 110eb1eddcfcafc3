import sys

from fastvit.viz.cli import main

sys.exit(main())
