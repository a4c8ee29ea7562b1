"""Model x data to arrays on disk: the activation store and the extraction that fills it."""
