"""Which training loss trains which architecture: the built-in table, in one place, plus the losses users
register for their own architectures or to replace a built-in one.

    from splinterp.train import register_loss
    register_loss("gated", my_gated_loss, overwrite=True)

Nothing is registered by importing a module: `BUILTIN_LOSSES` names every built-in loss explicitly, so
`get_loss` gives the same answer whatever was imported before.
"""

from __future__ import annotations

from types import MappingProxyType

from splinterp.errors import ConfigError
from splinterp.train.gated import gated_loss
from splinterp.train.jumprelu import jumprelu_loss
from splinterp.train.losses import LossFn, mse_loss, relu_l1_loss

BUILTIN_LOSSES: MappingProxyType[str, LossFn] = MappingProxyType({
    "relu": relu_l1_loss,
    "topk": mse_loss,
    "topk_abs": mse_loss,
    "jumprelu": jumprelu_loss,
    "gated": gated_loss,
})
"""The loss of each built-in architecture (read-only)."""

_registered: dict[str, LossFn] = {}


def register_loss(architecture: str, fn: LossFn, *, overwrite: bool = False) -> None:
    """Make `fn` the training loss of SAEs with this architecture (replacing a built-in or earlier
    registered loss only with overwrite=True)."""
    if not isinstance(architecture, str) or not architecture:
        raise ConfigError(f"architecture must be a non-empty string, got {architecture!r}")
    if not callable(fn):
        raise ConfigError(f"loss for {architecture!r} must be callable, got {type(fn).__name__}")
    current = _registered.get(architecture, BUILTIN_LOSSES.get(architecture))
    if current is not None and current is not fn and not overwrite:
        raise ConfigError(f"a loss is already registered for {architecture!r}; pass overwrite=True to replace it")
    _registered[architecture] = fn


def unregister_loss(architecture: str) -> None:
    """Drop a registered loss: the architecture goes back to its built-in loss (or to none)."""
    if architecture not in _registered:
        raise ConfigError(f"no loss was registered for {architecture!r} (built-in losses cannot be removed)")
    del _registered[architecture]


def get_loss(architecture: str) -> LossFn:
    """The loss of `architecture`: a registered one, else the built-in one; ConfigError naming the known ones."""
    fn = _registered.get(architecture, BUILTIN_LOSSES.get(architecture))
    if fn is None:
        raise ConfigError(
            f"no training loss registered for architecture {architecture!r} (known: {registered_losses()}); "
            "register one with splinterp.train.register_loss"
        )
    return fn


def registered_losses() -> list[str]:
    """Every architecture with a loss (built-in or registered)."""
    return sorted(set(BUILTIN_LOSSES) | set(_registered))
