"""The tutorial's client.py, batch-aware: same as ``tritonhf client``."""

import sys

from tritonhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["client", *sys.argv[1:]]))
