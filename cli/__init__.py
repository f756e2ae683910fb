"""The specsearch command line (Typer): thin commands over the library.

This package lives in the repository's top-level ``cli/`` folder and is installed as
``specsearch.cli`` (``pyproject.toml`` maps it with ``package-dir``); the console script
``specsearch`` is ``specsearch.cli.app:main``. Only this package imports typer or prints.
"""
