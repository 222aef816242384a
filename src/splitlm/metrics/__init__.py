"""Metrics: loggers, traffic accounting, evaluation and run reports."""
