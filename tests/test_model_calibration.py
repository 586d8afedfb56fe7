"""Calibrating a Llama (models.calibration): the forward passes it measures are the model's own prefill, the paper
recipe on the model is the package's search on the inputs the prefill attends over, the loss gradients the budget
recipes weigh attention errors by, and whole-model calibration to a KL or density budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sale_jax
from models import checkpoint, llama
from models.calibration import _dense_sensitivities, attention_inputs, calibrate_model, scored_log_probs
from sale_jax.calibration import per_row_l1_error

FIXTURE = "tests/fixtures/tiny_llama"
SALE = sale_jax.SaleConfig(dense_below=0, block_q=16, block_k=16, sink_tokens=16, local_tokens=16,
                           backend="reference")
# Every test here compares f32 models, so matmuls run in full f32 on a GPU too.
pytestmark = pytest.mark.usefixtures("exact_f32_matmuls")


@pytest.fixture(scope="module")
def sale_model():
    return checkpoint.load_llama(FIXTURE, dtype="float32", attention="sale", sale=SALE)


def _lengths(tokens):
    return jnp.full((tokens.shape[0],), tokens.shape[1])


def _prefill_attention_inputs(model, tokens, monkeypatch):
    """Each layer's `(q, k, v)` as the model's own jitted prefill hands them to its attention."""
    attend = llama.Attention.attend

    def run(model, tokens):
        recorded = []

        def recording(self, q, k, v, tau):
            recorded.append((q, k, v))
            return attend(self, q, k, v, tau)

        with monkeypatch.context() as patch:
            patch.setattr(llama.Attention, "attend", recording)
            model.prefill(tokens, _lengths(tokens))
        return recorded

    return nnx.jit(run)(model, tokens)


def _prefill_log_probs(model, tokens, scored, thresholds=None):
    logits, _ = llama.prefill(model, tokens, _lengths(tokens), thresholds)
    return jax.nn.log_softmax(logits[:, scored], axis=-1)


def test_calibration_measures_the_models_own_prefill(sale_model, rng, monkeypatch):
    dense_model = llama.with_attention(sale_model, "dense")
    tokens = jnp.asarray(rng.integers(0, 256, size=(1, 160)), jnp.int32)
    prefilled = _prefill_attention_inputs(dense_model, tokens, monkeypatch)
    assert len(prefilled) == sale_model.config.num_layers
    for captured, want in zip(attention_inputs(sale_model, tokens), prefilled, strict=True):
        for got, expected in zip(captured, want):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)

    scored = jnp.arange(100, 160)
    log_p, qkvs = nnx.jit(scored_log_probs)(sale_model, tokens, scored)
    np.testing.assert_allclose(log_p, _prefill_log_probs(dense_model, tokens, scored), atol=1e-5)
    for got, expected in zip(qkvs, prefilled):
        for array, want in zip(got, expected):
            np.testing.assert_allclose(array, want, rtol=1e-6, atol=1e-6)

    # The paper recipe on the model is the package's search on the layers' inputs the prefill attends over.
    search = dict(theta=1e-2, tau0=1.0, tau_min=1e-3)
    thresholds = calibrate_model(sale_model, [tokens[0]], model_name="tiny", progress=False, **search)
    independent = sale_jax.calibrate([prefilled], 2, 4, SALE, progress=False, **search)
    np.testing.assert_array_equal(thresholds.tau, independent.tau)
    assert np.any(np.asarray(thresholds.tau) < search["tau0"])  # the search moved
    assert thresholds.config == SALE and thresholds.recipe_params == {"name": "paper", **search}
    for layer, (q, k, v) in enumerate(prefilled):
        error = per_row_l1_error(sale_jax.sale_attention(q, k, v, thresholds.layer(layer), SALE),
                                 sale_jax.dense_attention(q, k, v))
        assert np.all(np.asarray(error) < search["theta"])


def test_loss_gradients_match_finite_differences(rng):
    model = checkpoint.load_llama(FIXTURE, dtype="float32")
    tokens = jnp.asarray(rng.integers(0, 256, size=(1, 48)), jnp.int32)
    scored = jnp.arange(32, 48)
    log_p, qkvs, grads = _dense_sensitivities(model, tokens, scored)
    assert len(qkvs) == len(grads) == model.config.num_layers
    greedy = jnp.argmax(log_p, axis=-1)
    layer = 1
    direction = jnp.asarray(rng.normal(size=grads[layer].shape), jnp.float32)
    step = 1e-2

    def loss(shift):
        shifts = [jnp.zeros_like(g) for g in grads]
        shifts[layer] = shift
        shifted, _ = scored_log_probs(model, tokens, scored, head_shifts=shifts)
        return -jnp.take_along_axis(shifted, greedy[..., None], axis=-1).sum()

    def central(h):
        return (loss(h * direction) - loss(-h * direction)) / (2 * h)

    # Richardson's extrapolation of two central differences cancels their O(step^2) truncation.
    numeric = (4 * central(step / 2) - central(step)) / 3
    analytic = jnp.sum(grads[layer] * direction)
    unshifted = float(loss(jnp.zeros_like(direction)))
    # What is left is the f32 rounding of the losses (a few ulps each, amplified by 1 / step in the differences;
    # 3x that of one difference at `step` after the extrapolation) and the O(step^4) truncation.
    rounding = 3 * 8 * abs(unshifted) * np.finfo(np.float32).eps / (2 * step)
    assert abs(float(analytic) - float(numeric)) <= rounding + 1e-3 * abs(float(analytic)), (analytic, numeric)


def _kl_from_prefills(sale_model, prompts, scored_positions, thresholds):
    """Mean KL divergence (nats) of the SALE model's next-token distributions from the dense model's at the scored
    positions, each from the model's own prefill."""
    dense_model = llama.with_attention(sale_model, "dense")
    kls = []
    for prompt, scored in zip(prompts, scored_positions):
        tokens = jnp.asarray(prompt, jnp.int32)[None]
        dense = _prefill_log_probs(dense_model, tokens, scored)
        sparse = _prefill_log_probs(sale_model, tokens, scored, thresholds)
        kls.append(float(jnp.mean(jnp.sum(jnp.exp(dense) * (dense - sparse), axis=-1))))
    return np.mean(kls)


def test_kl_budget_recipe_meets_its_budget_on_the_model_and_trades_density_for_it(sale_model, rng):
    prompts = [rng.integers(0, 256, size=160) for _ in range(2)]
    tight = calibrate_model(sale_model, prompts, "kl_budget", kl_budget=1e-3, score_tokens=48, progress=False)
    loose = calibrate_model(sale_model, prompts, "kl_budget", kl_budget=0.3, score_tokens=48, progress=False)
    assert tight.recipe_params["name"] == "kl_budget" and tight.config == SALE
    for thresholds, budget in ((tight, 1e-3), (loose, 0.3)):
        kl = _kl_from_prefills(sale_model, prompts, [jnp.arange(112, 160)] * 2, thresholds)
        assert kl <= budget
        # Within f32 rounding: the calibration's program and the prefill reduce in different orders.
        np.testing.assert_allclose(kl, thresholds.recipe_params["calibration_kl"], rtol=1e-2, atol=1e-7)
    # A smaller price takes, per head, a point of no higher density on the same (dense-pass) inputs.
    assert loose.recipe_params["calibration_density"] <= tight.recipe_params["calibration_density"]


def test_kl_budget_recipe_scores_the_positions_it_is_given(sale_model, rng):
    prompts = [rng.integers(0, 256, size=160) for _ in range(2)]
    positions = [np.sort(rng.choice(160, size=12, replace=False)) for _ in prompts]
    thresholds = calibrate_model(sale_model, prompts, "kl_budget", kl_budget=1e-3, scored_positions=positions,
                                 progress=False)
    assert thresholds.recipe_params["scored"] == "given" and thresholds.recipe_params["scored_per_prompt"] == 12
    kl = _kl_from_prefills(sale_model, prompts, positions, thresholds)
    assert kl <= 1e-3
    # Within f32 rounding: the calibration's program and the prefill reduce in different orders.
    np.testing.assert_allclose(kl, thresholds.recipe_params["calibration_kl"], rtol=1e-2, atol=1e-7)
    for bad in ([positions[0]], [positions[0], np.array([0, 160])], [positions[0], np.array([], np.int32)]):
        with pytest.raises(ValueError, match="scored_positions"):
            calibrate_model(sale_model, prompts, "kl_budget", scored_positions=bad, progress=False)


def test_density_budget_recipe_spends_at_most_its_density(sale_model, rng):
    prompts = [rng.integers(0, 256, size=160)]
    thresholds = calibrate_model(sale_model, prompts, "density_budget", density=0.6, score_tokens=48,
                                 progress=False)
    assert thresholds.recipe_params["calibration_density"] <= 0.6
    # The density it reports is that of the layers' inputs in the dense forward pass: measured again here.
    tokens = jnp.asarray(prompts[0], jnp.int32)[None]
    densities = [float(sale_jax.select_blocks(q, k, thresholds.layer(layer), SALE).density())
                 for layer, (q, k, _) in enumerate(attention_inputs(sale_model, tokens))]
    np.testing.assert_allclose(np.mean(densities), thresholds.recipe_params["calibration_density"], atol=1e-6)


@pytest.mark.parametrize("arguments,message", [
    (dict(recipe="bogus"), "recipe must be one of"),
    (dict(recipe="kl_budget", kl_budget=0.0), "kl_budget must be > 0"),
    (dict(recipe="density_budget", density=1.5), "density must be in \\(0, 1\\]"),
    (dict(recipe="kl_budget", cost="l2"), "cost must be one of"),
    (dict(recipe="kl_budget", tau0=0.01), "takes no"),
])
def test_calibrate_model_rejects_bad_recipe_arguments(sale_model, arguments, message):
    with pytest.raises(ValueError, match=message):
        calibrate_model(sale_model, [np.zeros(64, np.int32)], progress=False, **arguments)
