"""``python -m diffcore.train`` with the tests' tiny model registered (run as a script from here)."""

from __future__ import annotations

import logging
import sys

import tiny_model  # noqa: F401  (registers the model "tiny_denoiser")

from diffcore.train import main_train

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(main_train(sys.argv[1:]))
