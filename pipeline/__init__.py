"""cxr-dwml: multi-label chest X-ray classification with a dual-weighted metric loss.

The library knows nothing of Airflow, DVC or the command line; `components/` wraps it.
"""

__version__ = "0.1.0"
