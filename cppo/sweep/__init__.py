"""Config-driven sweeps (`cppo sweep`), a wing on top of `cppo train` that never imports torch or the
trainer: the sweep file and its trials (`spec`), the trials run as processes (`runner`), their results
(`report`), wandb sweep definitions (`wandb_export`) and the command that ties them (`command`)."""

from .command import run_sweep
from .spec import load_sweep

__all__ = ["load_sweep", "run_sweep"]
