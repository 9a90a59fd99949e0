import sys

from growth_ds.cli import main

sys.exit(main())
