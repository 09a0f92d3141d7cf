"""How a surgery records itself: a key of the transformer's config (set by `apply_*`, dropped by `remove_*`)."""


def drop_config_key(model, key: str) -> None:
    """Forget a surgery's settings in `model`'s config (its `remove_*`): the config is frozen, so it is replaced."""
    config = dict(model.config)
    config.pop(key, None)
    model._internal_dict = type(model.config)(config)
