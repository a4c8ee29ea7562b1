"""Figures: one function per chart, each taking a result type of probing_core.analyses and returning a plotly Figure.

Every chart names hooks with :func:`hook_label` ("layer 5 · resid post"); pages use it for hook names in text too.
"""
from probing_core.plots._common import hook_label

__all__ = ["hook_label"]
