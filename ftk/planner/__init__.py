"""The memory planner: how much memory a training run needs per device, whether it fits, and what would.

Split by concern: `shapes` (a model's shape from options or config.json), `setup` (everything else that
decides memory, read from a composed config), `costs` (the arithmetic, component by component; its
docstring states the method and how it was measured), `suggestions` (what would make a run fit),
`budget` (the machine's memory) and `report` (tables, verdicts, the check before launch). Pure arithmetic,
no torch at import. The CPU heap policy that uses a plan at run time is ftk.cpu_heap.
"""

from ftk.planner.budget import budget_for, detect_budget, ram_bytes
from ftk.planner.costs import Estimate, Suggestion
from ftk.planner.report import check_before_launch, print_estimate
from ftk.planner.setup import Setup, adapter_targets, setup_from_cfg
from ftk.planner.shapes import GB, Linear, Shape, shape_from_checkpoint, shape_from_config, shape_from_model_options
from ftk.planner.suggestions import estimate, suggestions

__all__ = ["GB", "Estimate", "Linear", "Setup", "Shape", "Suggestion", "adapter_targets", "budget_for",
           "check_before_launch", "detect_budget", "estimate", "print_estimate", "ram_bytes", "setup_from_cfg",
           "shape_from_checkpoint", "shape_from_config", "shape_from_model_options", "suggestions"]
