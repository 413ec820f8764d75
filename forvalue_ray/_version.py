"""The package version, in a module of its own so that any module can import it (the package's __init__ imports
those modules). Keep it equal to ``version`` in pyproject.toml."""

__version__ = "0.1.0"
