import sys

from rstar_cli.main import main

sys.exit(main())
