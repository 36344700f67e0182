"""draftwise: lossless speculative decoding with draft trees."""

from draftwise.core.decode import GenerationStats
from draftwise.core.errors import DraftwiseError
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling
from draftwise.engine import Engine, Generation, load

__all__ = ["DraftTree", "DraftwiseError", "Engine", "Generation", "GenerationStats", "Sampling", "load"]
__version__ = "0.1.0"
