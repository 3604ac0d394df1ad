"""Plain SGD / Adam training of an SAE: every parameter (encoder and decoder) follows the gradient of the
architecture's registered loss."""

from __future__ import annotations

from splinterp.errors import ConfigError
from splinterp.sae import SAE
from splinterp.train.config import SGDConfig
from splinterp.train.engine import Callback, Trainer
from splinterp.train.history import History


class SGDTrainer(Trainer):
    method = "sgd"


def train_sgd(sae: SAE, data, cfg: SGDConfig | None = None, *, eval_data=None,
              callback: Callback | None = None) -> History:
    """Train `sae` in place on `data` (a tensor [N, d_in] or a re-iterable of batches); returns its History.

    `eval_data` (optional) gives the test_* columns. `callback(TrainEvent)` runs after every mini-batch
    and epoch (after any checkpoint), and may raise to stop the run.
    """
    cfg = cfg if cfg is not None else SGDConfig()
    if not isinstance(cfg, SGDConfig):
        raise ConfigError(f"cfg must be an SGDConfig, got {type(cfg).__name__}")
    return SGDTrainer(sae, data, cfg, eval_data=eval_data, callback=callback).run()
