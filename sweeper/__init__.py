"""sweeper: hyperparameter-transfer sweeps (grid -> Ray Tune -> Parquet -> report)."""

__version__ = "0.1.0"
