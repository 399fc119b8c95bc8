"""lab: a Hydra-configured PyTorch research template.

Importing the package only registers the OmegaConf resolvers and the typed config schemas the configs use;
everything heavy is imported where it is needed so that `python train.py` starts fast.
"""

from lab.callbacks.base import Callback
from lab.config import register_schemas
from lab.resolvers import register_resolvers

register_resolvers()
register_schemas()

__all__ = ["Callback", "register_resolvers", "register_schemas"]
