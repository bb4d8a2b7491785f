"""lmsd: the lms daemon. Keep this module free of heavy imports: the CLI imports from the package."""

__version__ = "0.1.0"
