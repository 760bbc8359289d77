"""pqcompile: a torch.compile backend that keeps Hugging Face decoders' key cache compressed with PolarQuant."""

from .config import PolarQuantConfig
from .dynamic import reserve
from .static_cache import PolarStaticCache

__all__ = ["PolarQuantConfig", "PolarStaticCache", "reserve"]
__version__ = "0.1.0"
