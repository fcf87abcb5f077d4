"""Posterior inference with trained conditional flows: sampling, streaming moments, calibration,
and the ``invnet sample`` job that writes them to Zarr."""
from .calibration import COVERAGE_LEVELS, Calibration
from .job import report_path, sample_job
from .moments import RunningMoments
from .sampler import PosteriorSampler, PosteriorSummary, Sampler, summarize_posterior
from ..plotting import plot_coverage, plot_error_vs_std, plot_posterior

__all__ = [
    "RunningMoments", "Sampler", "PosteriorSampler", "PosteriorSummary", "summarize_posterior", "Calibration",
    "COVERAGE_LEVELS", "sample_job", "report_path", "plot_posterior", "plot_error_vs_std", "plot_coverage",
]
