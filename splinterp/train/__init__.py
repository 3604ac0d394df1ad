"""Training: SGD and PAM-SGD trainers, the exact decoder solve, losses, History and checkpoints.

    from splinterp.train import PAMConfig, train_pam_sgd
    hist = train_pam_sgd(sae, X_train, PAMConfig(epochs=10, batch_size=128, lr=3e-3), eval_data=X_test)
    hist["test_mse"]
"""

from splinterp.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from splinterp.train.config import PAMConfig, SGDConfig
from splinterp.train.decoder import DecoderAccumulator, SparseCodes, solve_decoder
from splinterp.train.engine import TrainEvent, encoder_parameter_names
from splinterp.train.history import History
from splinterp.train.loss_registry import get_loss, register_loss, registered_losses, unregister_loss
from splinterp.train.pam import PAMTrainer, train_pam_sgd
from splinterp.train.sgd import SGDTrainer, train_sgd

__all__ = [
    "DecoderAccumulator", "History", "PAMConfig", "PAMTrainer", "SGDConfig", "SGDTrainer", "SparseCodes",
    "TrainEvent", "encoder_parameter_names", "get_loss", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "register_loss", "registered_losses", "solve_decoder", "train_pam_sgd", "train_sgd",
    "unregister_loss",
]
