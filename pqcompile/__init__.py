"""pqcompile: a torch.compile backend that keeps Hugging Face decoders' key cache compressed with PolarQuant."""

from .config import PolarQuantConfig
from .static_cache import PolarStaticCache

__all__ = ["PolarQuantConfig", "PolarStaticCache"]
__version__ = "0.1.0"
