"""tests/swift needs ms-swift's stack (ms-swift 4.6.0, transformers < 5.20): collected only where the
distribution is installed (the nox session `swift`). Asked of the installed distributions, not of
the import system, like tests/llamafactory."""

from importlib import metadata

try:
    metadata.version("ms-swift")
    collect_ignore_glob = []
except metadata.PackageNotFoundError:
    collect_ignore_glob = ["*.py"]
