"""flatlm: pretrain and fine-tune Transformer LMs with first-class, swappable, sharded optimizers."""

__version__ = "0.1.0"
