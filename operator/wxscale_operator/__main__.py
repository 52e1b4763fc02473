import sys

from wxscale_operator.main import main

sys.exit(main())
