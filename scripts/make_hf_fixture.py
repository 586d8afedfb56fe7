"""Generate a tiny Hugging Face fixture of one model family in ``tests/fixtures/tiny_<family>/``.

Each fixture is a small, randomly initialised ``transformers`` causal LM (GQA) plus reference logits and greedy
tokens for fixed token ids. The project's Flax decoder loads the checkpoint and checks its logits and greedy
decoding against ``inputs_and_logits.npz`` on the CPU. ``--family``:

* ``llama`` -- ``LlamaForCausalLM``, llama3 RoPE scaling, untied embeddings, also saved sharded.
* ``qwen2`` -- ``Qwen2ForCausalLM``: biases on the q/k/v projections, tied embeddings.
* ``qwen3`` -- ``Qwen3ForCausalLM``: RMSNorm on each head's q and k, ``head_dim`` (32) not hidden/heads, tied.
* ``mistral`` -- ``MistralForCausalLM`` with ``sliding_window`` null (full attention), untied embeddings.

The fixture is regenerated ONLY by this script; do not edit the files by hand. torch and transformers are NOT
project dependencies, so run it from a throwaway virtual environment outside the repository, e.g.::

    python3 -m venv /tmp/hfenv
    /tmp/hfenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/hfenv/bin/python scripts/make_hf_fixture.py --family=qwen3   # writes tests/fixtures/tiny_qwen3/

Files written (under ``--outdir``, default ``tests/fixtures/tiny_<family>``):

* ``config.json``, ``model.safetensors`` (float32), ``generation_config.json`` -- ``save_pretrained`` output.
* ``sharded/`` (llama only) -- the same weights saved with a small ``max_shard_size`` so they span several
  ``model-0000x-of-0000y.safetensors`` files plus ``model.safetensors.index.json``.
* ``inputs_and_logits.npz`` -- ``tokens`` (int32 [2, 40], numpy seed 1, values in [0, 256)),
  ``logits`` (float32 [2, 40, 256]) from the model in eval mode, no padding, and ``greedy`` (int32 [2, 8]):
  ``generate``'s greedy continuation of ``tokens`` (no end-of-sequence stop). The committed llama fixture was made
  before ``greedy`` was added and has none; its tests check decoding against its own prefill instead.

The output folder is emptied of these files before writing, so stale shards never linger.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedModel,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"

TORCH_SEED = 0
NUMPY_SEED = 1
BATCH, SEQ_LEN = 2, 40
GREEDY_TOKENS = 8
MIN_GREEDY_MARGIN = 1e-3  # top-1 minus top-2 logit along the greedy path: far above the parity tests' 1e-4
WEIGHT_STD = 0.08  # large enough that the logits are not trivially small
NORM_STD = 0.1  # RMSNorm weights are 1 + NORM_STD * normal
SHARD_SIZE = "100KB"
MAX_FIXTURE_BYTES = 1_100_000  # "about 1 MB"

ROPE_THETA = 500000.0
ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small on purpose: with head_dim=16 the wavelengths span ~6 to ~1e6 positions, so with an original length of
    # 64 the llama3 rule leaves some frequencies alone, smooths some and divides the rest by `factor`.
    "original_max_position_embeddings": 64,
}


# family -> (config class, model class, config fields of its own, RoPE scaling, also saved sharded)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
              ROPE_SCALING, True),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, use_sliding_window=False), None, False),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM,
              dict(head_dim=32, tie_word_embeddings=True, attention_bias=False, use_sliding_window=False), None, False),
    "mistral": (MistralConfig, MistralForCausalLM, dict(tie_word_embeddings=False, sliding_window=None), None, False),
}


def make_config(family: str):
    config_class, _, own_fields, scaling, _ = FAMILIES[family]
    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        attn_implementation="eager",  # plain reference attention; the saved config does not depend on it
    )
    kwargs.update(own_fields)
    if hasattr(config_class(), "rope_parameters"):
        # transformers >= 5: `rope_scaling` and `rope_theta` are merged into `rope_parameters`;
        # `torch_dtype` is renamed `dtype`.
        kwargs["rope_parameters"] = {"rope_theta": ROPE_THETA, **(scaling or {"rope_type": "default"})}
        kwargs["dtype"] = "float32"
    else:
        kwargs["rope_theta"] = ROPE_THETA
        kwargs["rope_scaling"] = None if scaling is None else dict(scaling)
        kwargs["torch_dtype"] = "float32"
    return config_class(**kwargs)


def reinit_weights(model: torch.nn.Module) -> None:
    """All weights ~ N(0, WEIGHT_STD^2), except RMSNorm weights = 1 + NORM_STD * N(0, 1)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm, q/k_norm
                param.copy_(1.0 + NORM_STD * torch.randn_like(param))
            else:
                param.normal_(mean=0.0, std=WEIGHT_STD)


def save(model: PreTrainedModel, outdir: Path, **kwargs) -> None:
    # `safe_serialization` was removed in transformers 5 (safetensors is always written); pass it where it exists.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(outdir, **kwargs)


def run_logits(model: PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    input_ids = torch.from_numpy(tokens.astype(np.int64))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits.to(torch.float32).numpy()


def run_greedy(model: PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    """``generate``'s greedy continuation, checked against re-running the whole sequence for every token and
    required to have no near-tie (a tie could go either way in another implementation)."""
    input_ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=GREEDY_TOKENS, min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    greedy = out[:, tokens.shape[1]:].numpy()
    assert greedy.shape == (BATCH, GREEDY_TOKENS), greedy.shape
    sequence = tokens
    for step in range(GREEDY_TOKENS):
        last = run_logits(model, sequence)[:, -1]
        top2 = np.sort(last, axis=-1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > MIN_GREEDY_MARGIN), f"near-tie at greedy step {step}: {top2}"
        np.testing.assert_array_equal(last.argmax(-1), greedy[:, step], err_msg=f"generate at step {step}")
        sequence = np.concatenate([sequence, greedy[:, step:step + 1]], axis=1)
    return greedy.astype(np.int32)


def clean(outdir: Path) -> None:
    for name in ("config.json", "generation_config.json", "model.safetensors", "inputs_and_logits.npz"):
        (outdir / name).unlink(missing_ok=True)
    if (outdir / "sharded").exists():
        shutil.rmtree(outdir / "sharded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--outdir", type=Path, help="default: tests/fixtures/tiny_<family>")
    args = parser.parse_args()
    outdir: Path = args.outdir or FIXTURES / f"tiny_{args.family}"
    _, model_class, _, _, sharded = FAMILIES[args.family]
    sharded_dir = outdir / "sharded"

    torch.manual_seed(TORCH_SEED)
    config = make_config(args.family)
    model = model_class(config)
    reinit_weights(model)
    model = model.to(torch.float32).eval()

    tokens = np.random.default_rng(NUMPY_SEED).integers(0, config.vocab_size, size=(BATCH, SEQ_LEN), dtype=np.int64)
    logits = run_logits(model, tokens)
    assert logits.shape == (BATCH, SEQ_LEN, config.vocab_size) and logits.dtype == np.float32
    greedy = run_greedy(model, tokens)

    outdir.mkdir(parents=True, exist_ok=True)
    clean(outdir)
    save(model, outdir)
    if sharded:
        save(model, sharded_dir, max_shard_size=SHARD_SIZE)
    np.savez(outdir / "inputs_and_logits.npz", tokens=tokens.astype(np.int32), logits=logits, greedy=greedy)

    # --- Checks -------------------------------------------------------------------------------------------------
    if sharded:
        shards = sorted(sharded_dir.glob("model-*-of-*.safetensors"))
        assert len(shards) >= 2 and (sharded_dir / "model.safetensors.index.json").exists(), (
            f"save_pretrained(max_shard_size={SHARD_SIZE!r}) did not shard: "
            f"{sorted(p.name for p in sharded_dir.iterdir())}"
        )
        assert not (sharded_dir / "model.safetensors").exists()

    state = {k: v.detach() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:  # the head is the embedding; save_pretrained writes it once
        assert state.pop("lm_head.weight").data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    with safe_open(outdir / "model.safetensors", framework="pt") as f:
        keys = sorted(f.keys())
        saved = {k: f.get_tensor(k) for k in keys}
    assert set(keys) == set(state), (set(keys) ^ set(state))
    for k in keys:
        assert saved[k].dtype == torch.float32, (k, saved[k].dtype)
        assert torch.equal(saved[k], state[k]), k
    if sharded:
        index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(keys)

    for d in (outdir, sharded_dir) if sharded else (outdir,):
        reloaded = model_class.from_pretrained(d, attn_implementation="eager").to(torch.float32).eval()
        np.testing.assert_array_equal(run_logits(reloaded, tokens), logits, err_msg=f"reload from {d}")

    # --- Report -------------------------------------------------------------------------------------------------
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"logits: shape {logits.shape}, std {logits.std():.4f}, max |x| {np.abs(logits).max():.4f}")
    print(f"greedy: {greedy.tolist()}")
    print(f"\nstate-dict keys in {outdir / 'model.safetensors'}:")
    for k in keys:
        print(f"  {k:50s} {tuple(saved[k].shape)} {str(saved[k].dtype).replace('torch.', '')}")
    print("\nfiles written:")
    total = 0
    for p in sorted(q for q in outdir.rglob("*") if q.is_file()):
        size = p.stat().st_size
        total += size
        print(f"  {p.relative_to(outdir.parent)}  {size:,} bytes")
    print(f"  total: {total:,} bytes")
    assert total <= MAX_FIXTURE_BYTES, f"fixture is {total:,} bytes, over {MAX_FIXTURE_BYTES:,}"


if __name__ == "__main__":
    main()
