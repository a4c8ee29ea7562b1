"""Figures: one function per chart, each taking a result type of probing_core.analyses and returning a plotly Figure."""
