"""lab: a Hydra-configured PyTorch research template.

Importing the package only registers the OmegaConf resolvers the configs use; everything heavy is imported where
it is needed so that `python train.py` starts fast.
"""

from lab.resolvers import register_resolvers

register_resolvers()

__all__ = ["register_resolvers"]
