"""ReGATE: reference-guided adaptive token elision for multimodal LLM fine-tuning."""

__version__ = "0.1.0"

from .config import ConfigError, ReGATEConfig  # noqa: E402
from .engine import BatchError, BypassError, ReGATEEngine, StepPlan  # noqa: E402
from .refcache import Fingerprint, RefCache, RefCacheWriter  # noqa: E402

__all__ = [
    "BatchError",
    "BypassError",
    "ConfigError",
    "Fingerprint",
    "ReGATEConfig",
    "ReGATEEngine",
    "RefCache",
    "RefCacheWriter",
    "StepPlan",
    "__version__",
]
