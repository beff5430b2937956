"""tests/legacy_vl2 needs VideoLLaMA2's stack (transformers 4.40-4.42): collected only there (nox
session `videollama2`). The tests that run upstream's own code also need a checkout of
DAMO-NLP-SG/VideoLLaMA2 (branch main) in $REGATE_VIDEOLLAMA2_SRC; without it they are skipped."""

import os
import sys
from pathlib import Path

import pytest
from packaging.version import Version
from transformers import __version__ as transformers_version

SRC_ENV = "REGATE_VIDEOLLAMA2_SRC"
collect_ignore_glob = [] if Version("4.40") <= Version(transformers_version) < Version("4.43") else ["*.py"]


@pytest.fixture(scope="session")
def videollama2_src() -> Path:
    """The VideoLLaMA2 checkout, importable in this process (as upstream's train.py makes it)."""
    src = os.environ.get(SRC_ENV)
    if not src:
        pytest.skip(f"needs upstream's source: set {SRC_ENV} to a checkout of DAMO-NLP-SG/VideoLLaMA2 (branch main)")
    path = Path(src).resolve()
    if not (path / "videollama2" / "train.py").is_file():
        pytest.fail(f"{SRC_ENV}={src} is not a VideoLLaMA2 checkout (no videollama2/train.py)")
    if str(path) not in sys.path:
        sys.path.append(str(path))
    return path
