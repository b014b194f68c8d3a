import sys

from tritonhf.cli import main

sys.exit(main())
