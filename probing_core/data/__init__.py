"""Text to tokens to labels: datasets, token labels and mined contexts."""
