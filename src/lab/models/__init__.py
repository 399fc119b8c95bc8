"""Models, built by `hydra.utils.instantiate(cfg.model)` from `conf/model/*.yaml`.

Every model exposes `features` (input → penultimate feature vector) and `head` (features → logits), so that
embeddings, feature caching and head replacement work the same way for all of them.
"""


def build_model(cfg):
    """`instantiate(cfg.model)` through `lab.config.build`: arguments checked, your model's errors with their traceback."""
    from lab.config import build

    return build(cfg, "model")
