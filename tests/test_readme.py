"""The README's code blocks are executed as written, so they cannot drift from the code."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def section_code(title: str) -> str:
    text = README.read_text()
    section = text[text.index(title):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README has no python block under {title!r}"
    return match.group(1)


def tour_code() -> str:
    return section_code("## A tour")


def test_readme_tour_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(tour_code(), str(README), "exec"), {"__name__": "readme_tour"})
    assert (tmp_path / "topk_power_diagram.png").stat().st_size > 0
    assert (tmp_path / "my_sae" / "cfg.json").exists()


# The inputs the "Bring your own SAE" lines name, made by the libraries themselves: folders they write, objects
# they build, and a Hugging Face cache holding a SAELens release (read offline).
_BYO_SETUP = """
import json, os, warnings
warnings.simplefilter("ignore")
import numpy as np, torch
import splinterp as sp
import sae_lens
from sparsify import SparseCoder, SparseCoderConfig
from dictionary_learning.trainers.top_k import AutoEncoderTopK
import sparsify.sparse_coder, sparsify.utils
sparsify.sparse_coder.decoder_impl = sparsify.utils.eager_decode  # CPU decoder
D = 16
g = torch.Generator().manual_seed(0)
def rand(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.3 if "threshold" in n else torch.randn(p.shape, generator=g))
saelens_sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=64)); rand(saelens_sae)
saelens_sae.save_model("saelens_sae")
sparse_coder = SparseCoder(D, SparseCoderConfig(k=4, num_latents=64)); rand(sparse_coder)
sparse_coder.save_to_disk("sparsify_saes/layers.6")
ae = AutoEncoderTopK(D, 64, 4); rand(ae)
os.makedirs("dictionary_learning/trainer_0")
json.dump({"trainer": {"dict_class": "AutoEncoderTopK", "k": 4, "lm_name": "gpt2", "layer": 6}},
          open("dictionary_learning/trainer_0/config.json", "w"))
torch.save(ae.state_dict(), "dictionary_learning/trainer_0/ae.pt")
W_enc, W_dec = torch.randn(D, 64, generator=g), torch.randn(64, D, generator=g)
b_enc, b_dec, threshold = torch.randn(64, generator=g), torch.randn(D, generator=g), torch.rand(64, generator=g)
os.makedirs("gemma_scope")
np.savez("gemma_scope/params.npz", W_enc=W_enc.numpy(), W_dec=W_dec.numpy(), b_enc=b_enc.numpy(),
         b_dec=b_dec.numpy(), threshold=threshold.numpy())
X = torch.randn(200, D, generator=g)
"""


def test_readme_bring_your_own_sae_runs(tmp_path):
    """Every line of the section, each on a real input, in a fresh process (huggingface_hub reads HF_HUB_OFFLINE
    and the cache location when it is imported)."""
    for lib in ("sae_lens", "sparsify", "dictionary_learning"):
        pytest.importorskip(lib, reason="the `interop` extra (pip install -e '.[interop]')")
    from safetensors.torch import save_file

    rev = "0" * 40
    release = tmp_path / "hub" / "models--jbloom--GPT2-Small-SAEs-Reformatted"
    folder = release / "snapshots" / rev / "blocks.8.hook_resid_pre"
    folder.mkdir(parents=True)
    (release / "refs").mkdir()
    (release / "refs" / "main").write_text(rev)
    import torch

    g = torch.Generator().manual_seed(1)
    save_file({"W_enc": torch.randn(16, 32, generator=g), "W_dec": torch.randn(32, 16, generator=g),
               "b_enc": torch.randn(32, generator=g), "b_dec": torch.randn(16, generator=g)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": 16, "d_sae": 32, "dtype": "float32", "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.8.hook_resid_pre", "sae_lens_version": "6.0.0"}}))
    code = section_code("## Bring your own SAE")
    lines = [ln for ln in code.splitlines() if ln.startswith("sae = ")]
    assert len(lines) == 8 and any("from_weights" in ln for ln in lines)
    script = _BYO_SETUP + "\nloaded = []\n" + "\n".join(
        ln if not ln.startswith("sae = ") else ln + "\nloaded.append(type(sae).__name__)" for ln in code.splitlines())
    script += "\nprint(json.dumps(loaded))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "hf_home"), "SPARSIFY_DISABLE_TRITON": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    tail = out.stdout.strip().splitlines()
    assert json.loads(tail[-1]) == ["SAE"] * 8  # every line gave a splinterp SAE
    assert int(tail[-2]) > 1  # regions of the last one on X


def test_readme_tables_are_the_committed_results():
    """Every results block of the README equals what its job renders from the committed results/ folder, so
    no number in those tables is copied by hand (`splinterp readme --results results` regenerates them)."""
    from splinterp.commands.readme import BLOCK, fill

    text = README.read_text()
    blocks = [m.group("job") + "/" + m.group("table") for m in BLOCK.finditer(text)]
    assert len(blocks) >= 20 and {"e2_mnist/claims", "e3_llm/claims", "shrinkage/claims"} <= set(blocks)
    _, stale = fill(text, README.parent / "results")
    assert not stale, f"README blocks differ from results/: {stale}; run `splinterp readme --results results`"
    results = json.loads((README.parent / "results" / "results.json").read_text())
    for job in {b.split("/")[0] for b in blocks}:
        assert results["jobs"][job]["status"] == "ok" and len(results["jobs"][job]["seeds"]) >= 5, job
