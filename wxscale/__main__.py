import sys

from wxscale.cli import main

sys.exit(main())
