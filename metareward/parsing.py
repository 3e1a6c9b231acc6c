"""The public parsing names: ``parse_score`` and ``parse_winner`` read a judge's and a meta-judge's verdict.

They live in :mod:`metareward.judging.parsing`; this module keeps them at the stable import path
``metareward.parsing`` that users' scripts rely on.
"""

from metareward.judging.parsing import parse_score, parse_winner

__all__ = ["parse_score", "parse_winner"]
