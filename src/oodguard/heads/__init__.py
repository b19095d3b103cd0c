"""Heads trained on frozen features: MOS's group-softmax head (``mos``) and the linear classifier of the text
benchmark (``text``)."""

from oodguard.heads.mos import MOSHead, default_groups, train_mos_head
from oodguard.heads.text import HeadConfig, LinearHead, load_or_train_head, train_linear_head

__all__ = ["HeadConfig", "LinearHead", "MOSHead", "default_groups", "load_or_train_head", "train_linear_head",
           "train_mos_head"]  # fmt: skip
