"""cppo: Continual Proximal Policy Optimization (CPPO, ICLR 2024) for causal language models."""

from .config import Config, UserError, load_config
from .trainer import CPPOTrainer, PPOTrainer

__all__ = ["CPPOTrainer", "Config", "PPOTrainer", "UserError", "load_config"]
__version__ = "0.1.0"
