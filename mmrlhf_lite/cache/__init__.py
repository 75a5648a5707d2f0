"""Content-keyed caches computed once, on disk: reward scores/critiques/margins and reference log-probs."""
