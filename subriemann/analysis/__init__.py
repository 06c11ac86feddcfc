"""Analysis of flows.

Theory diagnostics, linearized flows, critical sets, rank strata and cross-entropy.
"""

from subriemann.analysis import cross_entropy
from subriemann.analysis.convergence import (
    ConvergenceCertificate,
    adapted_rate,
    apriori_steps,
    linear_convergence_certificate,
)
from subriemann.analysis.critical import (
    CriticalSet,
    EquilibriumReport,
    classify_equilibrium,
    refine_critical_point,
    track_critical_set,
)
from subriemann.analysis.interpolation import (
    DecayFit,
    InterpolationDeviation,
    apriori_stopping_time,
    decay_rate,
    interpolation_deviation,
    linear_interpolation_residual,
)
from subriemann.analysis.linearized import OutputFlow, kernel_eigh, output_flow
from subriemann.analysis.moved import moved_getattr
from subriemann.analysis.strata import (
    SpaceRecipe,
    sample_strata,
    strata_graph,
)

__all__ = [
    "cross_entropy",
    "linear_convergence_certificate",
    "ConvergenceCertificate",
    "adapted_rate",
    "apriori_steps",
    "apriori_stopping_time",
    "linear_interpolation_residual",
    "decay_rate",
    "DecayFit",
    "interpolation_deviation",
    "InterpolationDeviation",
    "output_flow",
    "OutputFlow",
    "kernel_eigh",
    "classify_equilibrium",
    "EquilibriumReport",
    "refine_critical_point",
    "track_critical_set",
    "CriticalSet",
    "strata_graph",
    "sample_strata",
    "SpaceRecipe",
]

# plots live in the application layer now (subriemann.app.plots_analysis): importing
# them here would make the analysis look up, so the old names explain where they went
__getattr__ = moved_getattr(__name__, ["plot_critical_set", "plot_strata_graph"])
