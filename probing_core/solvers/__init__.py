"""Probe solvers: ridge paths, logistic paths over C, the all-hooks multiclass probe, splits and folds."""
