"""Runnable, documented end-to-end uses of invnet, one package each, launched alike:

    python -m applications.NAME --help

Every application trains through the library's run stack (``invnet.training``: the config
machinery and the one :class:`~invnet.training.Trainer`), so each gains checkpoints, exact resume,
SIGTERM (exit 75) and Ctrl-C (exit 130) handling, ``metrics.jsonl`` and ``metrics.png``. What an
application adds is its problem: a simulator or a data writer, its model or loss where they are
not the library's, and its evaluation. :mod:`applications.common` holds the command-line pieces
they share.
"""
