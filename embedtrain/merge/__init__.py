"""Model merging: pure functions on state dicts (linear, task arithmetic, TIES, DARE, SLERP, Self Positioning)."""

from embedtrain.merge.methods import (
    MERGE_METHODS,
    TaskVectorBasis,
    check_mergeable,
    dare_merge,
    linear_merge,
    merge_lora_into_base,
    method_params,
    self_positioning_merge,
    slerp_merge,
    spherical_mean_coefficients,
    task_arithmetic_merge,
    task_vectors,
    ties_merge,
)

__all__ = [
    "MERGE_METHODS",
    "TaskVectorBasis",
    "check_mergeable",
    "dare_merge",
    "linear_merge",
    "merge_lora_into_base",
    "method_params",
    "self_positioning_merge",
    "slerp_merge",
    "spherical_mean_coefficients",
    "task_arithmetic_merge",
    "task_vectors",
    "ties_merge",
]
