import sys

from wxscale_trainer.main import main

sys.exit(main())
