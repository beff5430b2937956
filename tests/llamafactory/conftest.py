"""tests/llamafactory needs LLaMA-Factory's stack (llamafactory 0.9.5, transformers <= 5.6): collected only
where the distribution is installed (the nox session `llamafactory`). Asked of the installed
distributions, not of the import system: with tests/ on sys.path this folder is itself a namespace
package named llamafactory."""

from importlib import metadata

try:
    metadata.version("llamafactory")
    collect_ignore_glob = []
except metadata.PackageNotFoundError:
    collect_ignore_glob = ["*.py"]
