"""Critique-based reward model: prompt template, loss, trainer, scorer (critique -> score)."""
