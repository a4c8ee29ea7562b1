"""The synthetic tree-search task, its small transformer and the shipped checkpoint."""
