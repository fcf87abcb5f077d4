"""Runnable, documented end-to-end applications of invnet (one sub-package each)."""
