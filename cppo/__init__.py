"""cppo: Continual Proximal Policy Optimization (CPPO, ICLR 2024) for causal language models.

The public API (docs/guides/python-api.md): `load_config` (a YAML file or a mapping, with overrides) → `Config`;
`run(config)` trains its task stream and returns the summary; `UserError` is what a bad input raises.
`PPOTrainer` and `CPPOTrainer` train one stage of a run (`cppo.continual.build_trainer` builds one).
"""

__all__ = ["CPPOTrainer", "Config", "PPOTrainer", "UserError", "load_config", "run"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use: `cppo sweep` and the config loader run without torch or the trainer.
    if name == "PPOTrainer":
        from .trainer import PPOTrainer

        return PPOTrainer
    if name == "CPPOTrainer":
        from .cppo_trainer import CPPOTrainer

        return CPPOTrainer
    if name == "Config":
        from .config import Config

        return Config
    if name == "UserError":
        from .errors import UserError

        return UserError
    if name == "load_config":
        from .config_loading import load_config

        return load_config
    if name == "run":
        from .continual import run

        return run
    raise AttributeError(f"module 'cppo' has no attribute {name!r}")
