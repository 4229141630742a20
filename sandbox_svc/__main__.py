import sys

from sandbox_svc.server import main

if __name__ == "__main__":
    sys.exit(main())
