"""Models, built by `hydra.utils.instantiate(cfg.model)` from `conf/model/*.yaml`.

Every model exposes `features` (input → penultimate feature vector) and `head` (features → logits), so that
embeddings, feature caching and head replacement work the same way for all of them.
"""


def build_model(cfg):
    """`instantiate(cfg.model)`, letting a model's `UserError` through (Hydra wraps constructor errors)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from lab.errors import UserError

    try:
        return instantiate(cfg)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise
