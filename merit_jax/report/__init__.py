"""Plots and reports of a run.

``plan_plots`` draws the plan step's figures: the task cosine matrix ordered
by group, the tasks in PCA coordinates, and the calibration curve. Plotting
uses matplotlib's non-interactive Agg backend, so it works without a display.
"""

from merit_jax.report.plan_plots import (
    plot_calibration_curve,
    plot_pca,
    plot_similarity,
    write_plan_plots,
)

__all__ = ["plot_calibration_curve", "plot_pca", "plot_similarity", "write_plan_plots"]
