"""Evaluation: generation (and, from the eval owners, VQA accuracy / caption loss)."""
