"""The Flax Llama: parity with Hugging Face transformers on a committed fixture, checkpoint I/O, SALE vs dense,
padded batches and greedy decoding."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sale_jax
from models import checkpoint, llama
from models.config import LlamaConfig

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_llama")
LOGIT_TOLERANCE = 1e-4  # f32 on both sides; observed differences are ~1e-6
# Every test here compares f32 models, so matmuls run in full f32 on a GPU too.
pytestmark = pytest.mark.usefixtures("exact_f32_matmuls")


def _fixture_inputs():
    data = np.load(os.path.join(FIXTURE, "inputs_and_logits.npz"))
    return jnp.asarray(data["tokens"]), data["logits"]


@pytest.mark.parametrize("folder", ["", "sharded"])
def test_logits_match_hugging_face(folder):
    model = checkpoint.load_llama(os.path.join(FIXTURE, folder), dtype="float32")
    assert model.config.rope_scaling is not None and model.config.num_kv_heads < model.config.num_heads
    tokens, want = _fixture_inputs()
    logits, _ = llama.prefill(model, tokens, jnp.full((tokens.shape[0],), tokens.shape[1]))
    np.testing.assert_allclose(logits, want, atol=LOGIT_TOLERANCE, rtol=LOGIT_TOLERANCE)


def test_train_forward_matches_hugging_face_and_returns_every_layers_residual():
    model = checkpoint.load_llama(FIXTURE, dtype="float32")
    tokens, want = _fixture_inputs()
    logits, residuals = nnx.jit(llama.Llama.train_forward)(model, tokens)
    np.testing.assert_allclose(logits, want, atol=LOGIT_TOLERANCE, rtol=LOGIT_TOLERANCE)
    assert len(residuals) == model.config.num_layers
    assert all(r.shape == (*tokens.shape, model.config.hidden_size) for r in residuals)
    # The logits are the final norm and head applied to the last residual.
    np.testing.assert_allclose(model.logits(residuals[-1]), logits, atol=1e-6, rtol=1e-6)


def test_sale_with_tau_zero_matches_the_dense_model():
    sale = sale_jax.SaleConfig(dense_below=0, block_q=16, block_k=16, sink_tokens=16, local_tokens=16,
                               backend="reference")
    dense_model = checkpoint.load_llama(FIXTURE, dtype="float32")
    sale_model = llama.with_attention(dense_model, "sale", sale)
    assert sale_model.config.attention == "sale" and dense_model.config.attention == "dense"
    tokens, _ = _fixture_inputs()
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1])
    dense, _ = llama.prefill(dense_model, tokens, lengths)
    zero = sale_jax.Thresholds.uniform(2, 4, value=0.0)
    got, _ = llama.prefill(sale_model, tokens, lengths, zero)
    np.testing.assert_allclose(got, dense, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs thresholds"):
        llama.prefill(sale_model, tokens, lengths)


@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_save_then_load_round_trips(tmp_path, rng, max_shard_bytes):
    model = llama.Llama(LlamaConfig.tiny(tie_word_embeddings=True), nnx.Rngs(int(rng.integers(1000))))
    checkpoint.save_llama(model, tmp_path, max_shard_bytes=max_shard_bytes)
    files = checkpoint.checkpoint_files(tmp_path)
    if max_shard_bytes:
        assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    else:
        assert [os.path.basename(f) for f in files] == ["model.safetensors"]
    loaded = checkpoint.load_llama(tmp_path, dtype="float32")
    assert loaded.config.tie_word_embeddings and loaded.lm_head is None
    tokens = jnp.asarray(rng.integers(0, 256, size=(2, 24)), jnp.int32)
    lengths = jnp.asarray([24, 24])
    np.testing.assert_array_equal(llama.prefill(model, tokens, lengths)[0], llama.prefill(loaded, tokens, lengths)[0])


def test_loading_casts_to_the_requested_dtype():
    model = checkpoint.load_llama(FIXTURE, dtype="bfloat16")
    assert model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16


def _broken_copy(tmp_path, edit):
    target = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("sharded"))
    from safetensors.flax import load_file, save_file
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors")
    return target


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.norm.weight"), "lacks .*norm.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.rotary.weight": t["model.norm.weight"]}), "no place for"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"][:5]}),
     "has shape"),
])
def test_loader_rejects_missing_unexpected_and_misshapen_tensors(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        checkpoint.load_llama(_broken_copy(tmp_path, edit), dtype="float32")


def test_loader_rejects_unknown_architectures(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "ckpt", ignore=shutil.ignore_patterns("sharded"))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
    with pytest.raises(ValueError, match="unsupported architecture: model_type='gemma2'"):
        checkpoint.load_llama(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError):
        checkpoint.load_llama(tmp_path)


def test_padded_batch_and_greedy_decoding_match_one_sequence_at_a_time(rng):
    model = checkpoint.load_llama(FIXTURE, dtype="float32")
    tokens, _ = _fixture_inputs()
    lengths = jnp.asarray([40, 27])
    padded = tokens.at[1, 27:].set(0)
    batched = llama.generate(model, padded, lengths, max_new_tokens=6)
    for b in range(2):
        alone = llama.generate(model, tokens[b:b + 1, :int(lengths[b])], lengths[b:b + 1], max_new_tokens=6)
        np.testing.assert_array_equal(batched[b], alone[0])
    # Greedy decoding continues exactly as re-running the prefill on the grown prompt would.
    grown = jnp.concatenate([tokens[:1], batched[:1, :-1]], axis=1)
    logits, _ = llama.prefill(model, grown, jnp.asarray([grown.shape[1]]))
    np.testing.assert_array_equal(jnp.argmax(logits[0, 39:], axis=-1), batched[0])


def test_new_thresholds_do_not_recompile_the_prefill(rng, caplog):
    import logging
    sale = sale_jax.SaleConfig(dense_below=0, block_q=16, block_k=16, sink_tokens=16, local_tokens=16,
                               backend="reference")
    model = llama.with_attention(checkpoint.load_llama(FIXTURE, dtype="float32"), "sale", sale)
    tokens, _ = _fixture_inputs()
    lengths = jnp.full((2,), 40)
    llama.prefill(model, tokens, lengths, sale_jax.Thresholds.uniform(2, 4, 0.01))
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        caplog.clear()
        for value in rng.uniform(0, 0.05, size=3):
            jax.block_until_ready(llama.prefill(model, tokens, lengths, sale_jax.Thresholds.uniform(2, 4, value)))
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()], caplog.text[:500]
