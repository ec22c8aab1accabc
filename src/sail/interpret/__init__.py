"""Interpretability: sparse fingerprint retrieval, autointerpretation, language-driven retrieval."""
