"""`python -m search_svc`: run the SearchService."""

import sys

from search_svc.server import main

sys.exit(main())
