"""Analyses: one function and one result type per question the pages ask."""
