"""tests/legacy needs LLaVA's stack (transformers 4.36-4.37): collected only in the nox `llava` session."""

import importlib.util

from packaging.version import Version
from transformers import __version__ as transformers_version

collect_ignore = [] if Version(transformers_version) < Version("4.38") and importlib.util.find_spec("llava") else ["legacy"]
