"""Test-time views of the inputs: seeded image corruptions (``corruptions``) and the cached model outputs of each
view (``outputs``), as CoVer uses them."""

from oodguard.views.corruptions import *  # noqa: F403
from oodguard.views.corruptions import __all__ as _corruptions_all
from oodguard.views.outputs import average_over_views, extract_views, iter_view_outputs, view_dataset_key

__all__ = [*_corruptions_all, "average_over_views", "extract_views", "iter_view_outputs", "view_dataset_key"]
