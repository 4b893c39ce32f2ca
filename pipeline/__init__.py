"""cxr-dwml: multi-label chest X-ray classification with a dual-weighted metric loss.

A library: functions take their settings, paths and tags as arguments, and know nothing of how they
are scheduled, versioned or called from a command line.
"""

__version__ = "0.1.0"
