"""What the LLM experiments share, as library code: the activations of a model on a text set, harvested
once and standardised on the training split (`LLMDataConfig`, `LLMContext`), a store of trained SAEs keyed by
everything that decides them (`SAEStore`), and training SAEs on one layer or a group of layers
(`train_layers_sae`, `LayerSAEConfig`, `SweepPointConfig`, `sparse_start`)."""

from splinterp.llm.data import LLMContext, LLMDataConfig, llm_texts, offline_cache
from splinterp.llm.store import STORE_VERSION, SAEStore, key_hash
from splinterp.llm.training import (
    SWEEP_ARCHITECTURES,
    LayerSAEConfig,
    SweepPointConfig,
    TrainedSAE,
    knob_name,
    layer_sae_name,
    sae_train_flops,
    sparse_start,
    train_layers_sae,
)

__all__ = [
    "STORE_VERSION", "SWEEP_ARCHITECTURES", "LLMContext", "LLMDataConfig", "LayerSAEConfig", "SAEStore",
    "SweepPointConfig", "TrainedSAE", "key_hash", "knob_name", "layer_sae_name", "llm_texts", "offline_cache",
    "sae_train_flops", "sparse_start", "train_layers_sae",
]
