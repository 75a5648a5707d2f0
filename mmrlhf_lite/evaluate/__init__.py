"""Evaluation: reward bench (Acc, Acc+ per category), policy metrics, reports."""
