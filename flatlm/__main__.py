"""``python -m flatlm COMMAND ...``: the ``flatlm`` command (``flatlm.train.cli``) from any Python, e.g. the one an
ablation's cells run under."""

from flatlm.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
