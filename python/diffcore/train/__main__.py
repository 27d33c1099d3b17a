"""``python -m diffcore.train`` (and ``torchrun ... -m diffcore.train``)."""

import logging
import sys

from diffcore.train.cli import main_train

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(main_train(sys.argv[1:]))
