"""The package version, in a module of its own: readable where the package's __init__ has not run
(the child processes of child_process.py)."""

__version__ = "0.1.0"
