"""pytorch-paligemma as one package, `paligemma`: its modules are the flat files beside this one.

In the clone, `python inference.py` finds this file first on its path, and `__path__` makes the folder the package,
so `from paligemma.console import log` reads console.py here. An installed wheel holds the same files under
site-packages/paligemma/, with this one as its __init__.py (pyproject.toml), where `__path__` names that folder. The
Python API is in api.py.
"""

import os

__path__ = [os.path.dirname(os.path.abspath(__file__))]


def cli():
    """The paligemma command: inference.py's command line, guarded (console.guard_start) before its libraries load."""
    from paligemma.console import guard_start

    guard_start()
    from paligemma.inference import cli

    cli()


def __getattr__(name: str):
    """paligemma.load and paligemma.Model (api.py), imported on first use: `import paligemma.kernels` alone does not
    import transformers."""
    if name in ("load", "Model"):
        from paligemma import api

        return getattr(api, name)
    raise AttributeError(f"module 'paligemma' has no attribute {name!r}")
