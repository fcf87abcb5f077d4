"""Posterior inference with trained conditional flows: sampling, streaming moments, calibration,
and the ``invnet sample`` job that writes them to Zarr."""
from ..plotting import plot_coverage, plot_error_vs_std, plot_posterior
from .calibration import COVERAGE_LEVELS, Calibration
from .job import is_sample_store, report_path, sample_job
from .moments import RunningMoments
from .sampler import PosteriorSampler, PosteriorSummary, Sampler, summarize_posterior

__all__ = [
    "RunningMoments", "Sampler", "PosteriorSampler", "PosteriorSummary", "summarize_posterior", "Calibration",
    "COVERAGE_LEVELS", "sample_job", "report_path", "is_sample_store", "plot_posterior", "plot_error_vs_std", "plot_coverage",
]
