"""draftwise: lossless speculative decoding with draft trees."""

from draftwise.decode import GenerationStats
from draftwise.engine import Engine, Generation, load
from draftwise.errors import DraftwiseError
from draftwise.tree import DraftTree
from draftwise.verify import Sampling

__all__ = ["DraftTree", "DraftwiseError", "Engine", "Generation", "GenerationStats", "Sampling", "load"]
__version__ = "0.1.0"
