"""Analysis of flows: theory diagnostics, linearized flows, critical sets, rank strata, cross-entropy."""

from subriemann.analysis.interpolation import (
    DecayFit,
    InterpolationDeviation,
    apriori_stopping_time,
    decay_rate,
    interpolation_deviation,
    linear_interpolation_residual,
)
from subriemann.analysis.linearized import OutputFlow, kernel_eigh, output_flow

__all__ = [
    "apriori_stopping_time",
    "linear_interpolation_residual",
    "decay_rate",
    "DecayFit",
    "interpolation_deviation",
    "InterpolationDeviation",
    "output_flow",
    "OutputFlow",
    "kernel_eigh",
]
