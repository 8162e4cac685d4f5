"""Analysis of a sweep's Parquet store: optimal lr per cell, transfer across width and depth,
norm transfer, scaling fits, figures and the HTML report.

Needs pandas, numpy, pyarrow and matplotlib only (no torch, no Ray): results copied from a
cluster can be analysed on a laptop.
"""

from .errors import AnalysisError
from .load import METRICS, Results, load_results
from .optimum import Optima, find_optima, locate_optimum
from .pipeline import Analysis, analyze
from .report import print_summary, write_report
from .transfer import TransferFit, fit_transfer

__all__ = [
    "METRICS",
    "Analysis",
    "AnalysisError",
    "Optima",
    "Results",
    "TransferFit",
    "analyze",
    "find_optima",
    "fit_transfer",
    "load_results",
    "locate_optimum",
    "print_summary",
    "write_report",
]
