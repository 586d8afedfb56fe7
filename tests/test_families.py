"""The Qwen2, Qwen3 and Mistral families on the one Llama-shaped decoder: parity with Hugging Face transformers'
logits and greedy `generate` on committed fixtures (made by `scripts/make_hf_fixture.py --family=...`), SALE with
tau 0 against dense attention, checkpoint round trips, sharding, and the configurations that are refused."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sale_jax
from models import checkpoint, llama
from models.calibration import calibrate_model
from models.config import LlamaConfig
from tests.test_llama import LOGIT_TOLERANCE

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ["qwen2", "qwen3", "mistral"]
pytestmark = pytest.mark.usefixtures("exact_f32_matmuls")


def _fixture(family: str) -> str:
    return os.path.join(FIXTURES, f"tiny_{family}")


def _fixture_data(family: str):
    data = np.load(os.path.join(_fixture(family), "inputs_and_logits.npz"))
    return jnp.asarray(data["tokens"]), data["logits"], data["greedy"]


def _hf_config(family: str) -> dict:
    with open(os.path.join(_fixture(family), "config.json")) as f:
        return json.load(f)


def test_each_family_sets_its_own_differences():
    configs = {family: LlamaConfig.from_hf(_fixture(family)) for family in FAMILIES}
    assert configs["qwen2"].qkv_bias and not configs["qwen2"].qk_norm and configs["qwen2"].tie_word_embeddings
    assert configs["qwen3"].qk_norm and not configs["qwen3"].qkv_bias and configs["qwen3"].tie_word_embeddings
    assert configs["qwen3"].head_dim == 32 != configs["qwen3"].hidden_size // configs["qwen3"].num_heads
    assert not (configs["mistral"].qkv_bias or configs["mistral"].qk_norm or configs["mistral"].tie_word_embeddings)
    assert all(config.rope_scaling is None for config in configs.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hugging_face(family):
    model = checkpoint.load_llama(_fixture(family), dtype="float32")
    tokens, want, _ = _fixture_data(family)
    logits, _ = llama.prefill(model, tokens, jnp.full((tokens.shape[0],), tokens.shape[1]))
    np.testing.assert_allclose(logits, want, atol=LOGIT_TOLERANCE, rtol=LOGIT_TOLERANCE)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hugging_face(family):
    model = checkpoint.load_llama(_fixture(family), dtype="float32")
    tokens, _, want = _fixture_data(family)
    got = llama.generate(model, tokens, jnp.full((tokens.shape[0],), tokens.shape[1]), max_new_tokens=want.shape[1])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_sale_with_tau_zero_matches_the_dense_model(family):
    sale = sale_jax.SaleConfig(dense_below=0, block_q=16, block_k=16, sink_tokens=16, local_tokens=16,
                               backend="reference")
    dense_model = checkpoint.load_llama(_fixture(family), dtype="float32")
    sale_model = checkpoint.load_llama(_fixture(family), dtype="float32", attention="sale", sale=sale)
    tokens, _, _ = _fixture_data(family)
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1])
    dense, _ = llama.prefill(dense_model, tokens, lengths)
    config = dense_model.config
    got, _ = llama.prefill(sale_model, tokens, lengths, sale_jax.Thresholds.uniform(config.num_layers,
                                                                                    config.num_heads, 0.0))
    np.testing.assert_allclose(got, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_round_trips(tmp_path, family):
    model = checkpoint.load_llama(_fixture(family), dtype="float32")
    checkpoint.save_llama(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model.config.family()
    loaded = checkpoint.load_llama(tmp_path, dtype="float32")
    assert loaded.config == model.config
    tokens, want, _ = _fixture_data(family)
    logits, _ = llama.prefill(loaded, tokens, jnp.full((tokens.shape[0],), tokens.shape[1]))
    np.testing.assert_allclose(logits, want, atol=LOGIT_TOLERANCE, rtol=LOGIT_TOLERANCE)


def test_a_family_is_chosen_by_architectures_without_model_type():
    config = {k: v for k, v in _hf_config("qwen3").items() if k != "model_type"}
    assert LlamaConfig.from_hf(config).qk_norm


@pytest.mark.parametrize("changes", [{"model_type": "gemma2"},
                                     {"model_type": None, "architectures": ["GemmaForCausalLM"]}])
def test_unknown_architectures_are_refused(changes):
    config = {k: v for k, v in {**_hf_config("mistral"), **changes}.items() if v is not None}
    with pytest.raises(ValueError, match=r"unsupported architecture.*supported: llama \(LlamaForCausalLM\), "
                                         r"mistral \(MistralForCausalLM\), qwen2 .*qwen3"):
        LlamaConfig.from_hf(config)


def test_sliding_windows_shorter_than_the_context_are_refused(tmp_path):
    config = {**_hf_config("mistral"), "sliding_window": 512}
    with pytest.raises(ValueError, match="sliding_window=512 .*only full attention is supported"):
        LlamaConfig.from_hf(config)
    shutil.copytree(_fixture("mistral"), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sliding_window"):
        checkpoint.load_llama(tmp_path / "ckpt")
    # A window as long as the context is full attention; Qwen's use_sliding_window: false switches the window off.
    assert LlamaConfig.from_hf({**config, "sliding_window": config["max_position_embeddings"]})
    assert LlamaConfig.from_hf({**_hf_config("qwen2"), "sliding_window": 512, "use_sliding_window": False})
    with pytest.raises(ValueError, match="sliding_window=512"):
        LlamaConfig.from_hf({**_hf_config("qwen2"), "sliding_window": 512, "use_sliding_window": True})


def test_output_projection_and_mlp_biases_are_refused():
    for name in ("attention_bias", "mlp_bias"):
        with pytest.raises(ValueError, match=f"{name}=true is not supported"):
            LlamaConfig.from_hf({**_hf_config("qwen3"), name: True})


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (CPU runs force 4 host devices)")
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tensor_and_data_parallel_model_equals_single_device(family):
    from models.sharding import make_mesh, shard_batch, shard_llama
    model = checkpoint.load_llama(_fixture(family), dtype="float32")
    tokens, _, _ = _fixture_data(family)
    lengths = jnp.asarray([40, 29])
    want, _ = llama.prefill(model, tokens, lengths)
    mesh = make_mesh(2, 2, devices=jax.devices()[:4])
    sharded = shard_llama(model, mesh)
    if family == "qwen2":
        assert sharded.layers[0].self_attn.q_proj.bias[...].sharding.spec == P("model")
    got, _ = llama.prefill(sharded, shard_batch(tokens, mesh), shard_batch(lengths, mesh))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_calibrates_within_its_kl_budget(family, rng):
    """The calibration scripts (and the demo and benchmarks) load any family through `checkpoint.load_llama`."""
    sale = sale_jax.SaleConfig(block_q=16, block_k=16, sink_tokens=16, local_tokens=16, backend="reference",
                               dense_below=0)
    model = checkpoint.load_llama(_fixture(family), dtype="float32", attention="sale", sale=sale)
    prompts = [rng.integers(0, model.config.vocab_size, size=96) for _ in range(2)]
    thresholds = calibrate_model(model, prompts, "kl_budget", kl_budget=1e-3, score_tokens=32, progress=False)
    assert thresholds.tau.shape == (model.config.num_layers, model.config.num_heads)
    assert thresholds.recipe_params["calibration_kl"] <= 1e-3
