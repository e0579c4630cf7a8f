"""``python -m flatlm.train [--config FILE.yaml] [key=value ...]`` (also under accelerate launch)."""

import sys

from flatlm.train.cli import run_train

sys.exit(run_train(sys.argv[1:], "python -m flatlm.train"))
