"""The tutorial's create_repository.py, batched: same as ``tritonhf build``."""

import sys

from tritonhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
