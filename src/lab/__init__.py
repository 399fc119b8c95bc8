"""lab: a Hydra-configured PyTorch research template.

Importing the package only registers the OmegaConf resolvers and the typed config schemas the configs use;
everything heavy is imported where it is needed so that `python train.py` starts fast. `lab.fit(overrides=[...])`
runs training from Python (`lab.api`).
"""

from typing import Any

from lab.callbacks.base import Callback
from lab.config import register_schemas
from lab.errors import UserError
from lab.resolvers import register_resolvers

register_resolvers()
register_schemas()

__all__ = ["Callback", "UserError", "fit", "register_resolvers", "register_schemas"]


def __getattr__(name: str) -> Any:
    if name == "fit":  # imported on first use: `import lab` stays cheap for train.py
        from lab.api import fit

        return fit
    raise AttributeError(f"module 'lab' has no attribute {name!r}")
