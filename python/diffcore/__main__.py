"""``python -m diffcore`` (and ``torchrun ... -m diffcore run STUDY ...``): the ``diffcore`` command."""

import sys

from diffcore.cli import main

if __name__ == "__main__":
    sys.exit(main())
