"""pqcompile: a torch.compile backend that keeps Hugging Face decoders' key cache compressed with PolarQuant."""

from .config import PolarQuantConfig

__all__ = ["PolarQuantConfig"]
__version__ = "0.1.0"
