"""Posterior inference with trained conditional flows: sampling, streaming moments, calibration,
and the ``invnet sample`` job that writes them to Zarr."""
from ..plotting import plot_coverage, plot_error_vs_std, plot_posterior, plot_rank_histograms, plot_tarp
from .calibration import COVERAGE_LEVELS, Calibration
from .diagnostics import PosteriorDiagnostics, chi2_sf, ks_pvalue, rank_uniformity, tarp_curve
from .job import is_sample_store, report_path, sample_job
from .moments import RunningMoments
from .sampler import PosteriorSampler, PosteriorSummary, Sampler, summarize_posterior

__all__ = [
    "RunningMoments", "Sampler", "PosteriorSampler", "PosteriorSummary", "summarize_posterior", "Calibration",
    "COVERAGE_LEVELS", "sample_job", "report_path", "is_sample_store",
    "PosteriorDiagnostics", "rank_uniformity", "tarp_curve", "chi2_sf", "ks_pvalue",
    "plot_posterior", "plot_error_vs_std", "plot_coverage", "plot_rank_histograms", "plot_tarp",
]
