"""Per-layer, per-q-head selection thresholds: a frozen pytree that can be saved, loaded and passed into jit."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from sale_jax.config import SaleConfig

DEFAULT_TAU = 0.008
STREAMING = math.inf  # a streaming head's tau: sink and local blocks only, and the kernels skip its estimate
_FILE_FORMAT = "sale-jax-thresholds"
_FILE_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1 recorded only the paper recipe's theta
# The SaleConfig fields that decide which blocks a threshold keeps: the block grid, the always-kept sink and local
# regions, the low-bit quantization of the estimate, and the softmax scale of the scores a threshold is compared
# with. Backend, interpret and dense_below change how or whether the selection runs, not what it selects.
SELECTION_FIELDS = ("block_q", "block_k", "sink_tokens", "local_tokens", "quant_granularity", "estimate", "scale")


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Thresholds:
    """`tau: f32[num_layers, num_q_heads]`; `tau == 0` marks a dense head, `tau == inf` a streaming one (sink and
    local blocks only; no estimate runs for it).

    Only `tau` is a pytree leaf, so new values do not recompile a jitted function; the provenance (model name, the
    calibration recipe and its parameters, the `SaleConfig` it was calibrated with) is static metadata. `recipe` is
    given as a dict of numbers and strings (e.g. `{"name": "paper", "theta": 0.4}`) and kept as sorted pairs, so
    that the metadata stays hashable.

    Construction checks `tau` (`check_thresholds_tau`): a float `[num_layers, num_q_heads]` array of values >= 0 or
    inf. A stack of thresholds is not one: batch the `tau` arrays and build `Thresholds` inside the vmapped function.
    """

    tau: jax.Array
    model_name: str = ""
    recipe: tuple = ()
    config: SaleConfig | None = None

    def __post_init__(self):
        if isinstance(self.recipe, dict):
            object.__setattr__(self, "recipe", tuple(sorted(self.recipe.items())))
        check_thresholds_tau(self.tau)

    def tree_flatten(self):
        return (self.tau,), (self.model_name, self.recipe, self.config)

    @classmethod
    def tree_unflatten(cls, metadata, children):
        return cls(children[0], *metadata)

    @classmethod
    def uniform(cls, num_layers: int, num_q_heads: int, value: float = DEFAULT_TAU, **metadata) -> "Thresholds":
        if num_layers < 1 or num_q_heads < 1:
            raise ValueError(f"need num_layers >= 1 and num_q_heads >= 1, got {num_layers}, {num_q_heads}")
        return cls(jnp.full((num_layers, num_q_heads), value, jnp.float32), **metadata)

    @property
    def recipe_params(self) -> dict:
        """The calibration recipe's name and parameters (empty for thresholds that were not calibrated)."""
        return dict(self.recipe)

    @property
    def num_layers(self) -> int:
        return self.tau.shape[0]

    @property
    def num_q_heads(self) -> int:
        return self.tau.shape[1]

    def layer(self, index: int) -> jax.Array:
        """f32 `[num_q_heads]`, the thresholds of layer `index`."""
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range for {self.num_layers} layers")
        return self.tau[index]

    def check_config(self, config: SaleConfig) -> None:
        """Raises ValueError if `config` differs from the calibration config in a field of `SELECTION_FIELDS`:
        a threshold found for one block grid, region or quantization keeps other blocks under another. Thresholds
        without a calibration config (e.g. `uniform`) run under any config."""
        if self.config is None:
            return
        differing = [name for name in SELECTION_FIELDS if getattr(self.config, name) != getattr(config, name)]
        if not differing:
            return
        source = f" of {self.model_name}" if self.model_name else ""
        details = "; ".join(f"{name}: calibrated {getattr(self.config, name)!r}, requested {getattr(config, name)!r}"
                            for name in differing)
        calibrated = ", ".join(f"{name}={getattr(self.config, name)!r}" for name in differing)
        raise ValueError(
            f"thresholds{source} were calibrated under another SaleConfig ({details}). Recalibrate them under the "
            f"requested config (sale_jax.calibrate, or python -m experiments.tools.calibrate), or run with the "
            f"calibrated one ({calibrated}).")

    def save(self, path: str | os.PathLike) -> None:
        """Writes a JSON file with the values and their provenance (readable, diffable, exact for f32)."""
        contents = {
            "format": _FILE_FORMAT,
            "version": _FILE_VERSION,
            "model_name": self.model_name,
            "recipe": self.recipe_params,
            "config": None if self.config is None else self.config.to_dict(),
            # JSON has no infinity: a streaming head's tau is written as the string "inf".
            "tau": [[value if math.isfinite(value) else "inf" for value in row]
                    for row in np.asarray(self.tau, np.float32).astype(np.float64).tolist()],
        }
        with open(path, "w") as f:
            json.dump(contents, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike, num_layers: int | None = None,
             num_q_heads: int | None = None) -> "Thresholds":
        """Reads a file written by `save`, checking its format, shape (against the given counts) and values."""
        with open(path) as f:
            try:
                contents = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a thresholds file ({e})") from None
        if not isinstance(contents, dict) or contents.get("format") != _FILE_FORMAT:
            raise ValueError(f"{path}: not a thresholds file (no 'format': '{_FILE_FORMAT}')")
        if contents.get("version") not in _READABLE_VERSIONS:
            raise ValueError(f"{path}: thresholds file version {contents.get('version')!r}, expected one of "
                             f"{_READABLE_VERSIONS}")
        try:
            tau = np.asarray(_streaming_as_inf(contents["tau"]), np.float64)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: 'tau' must be a [num_layers, num_q_heads] array of numbers and \"inf\" "
                             f"({e})") from None
        check_shape(tau.shape, where=str(path))
        for name, expected, actual in (("num_layers", num_layers, tau.shape[0]),
                                       ("num_q_heads", num_q_heads, tau.shape[1])):
            if expected is not None and expected != actual:
                raise ValueError(f"{path}: holds {actual} for {name}, expected {expected}")
        check_values(tau, where=str(path))
        recipe = _recipe_of(contents, path)
        return cls(
            jnp.asarray(tau, jnp.float32),
            model_name=str(contents.get("model_name", "")),
            recipe=recipe,
            config=_config_of(contents, path),
        )


def _config_of(contents: dict, path) -> SaleConfig | None:
    """The file's calibration config, or None where it records none."""
    config = contents.get("config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: 'config' must map SaleConfig fields to values, got {config!r}")
    try:
        return SaleConfig.from_dict(config)
    except ValueError as e:
        raise ValueError(f"{path}: 'config': {e}") from None


def _recipe_of(contents: dict, path) -> dict:
    """The file's recipe; version 1 files record only the paper recipe's `theta`."""
    if contents["version"] == 1:
        theta = contents.get("theta")
        if theta is None:
            return {}
        if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
            raise ValueError(f"{path}: 'theta' must be a positive number or null, got {theta!r}")
        return {"name": "paper", "theta": float(theta)}
    recipe = contents.get("recipe", {})
    if not isinstance(recipe, dict) or not all(
            isinstance(value, (int, float, str)) and not isinstance(value, bool) for value in recipe.values()):
        raise ValueError(f"{path}: 'recipe' must map names to numbers or strings, got {recipe!r}")
    return recipe


def _streaming_as_inf(rows):
    """The file's rows with "inf" read as infinity; any other string is refused."""
    def number(value):
        if isinstance(value, str):
            if value != "inf":
                raise TypeError(f"found the string {value!r}")
            return math.inf
        return value
    if not isinstance(rows, list):
        raise TypeError(f"got {type(rows).__name__}")
    return [[number(value) for value in row] if isinstance(row, list) else row for row in rows]


def check_thresholds_tau(tau, where: str = "Thresholds") -> None:
    """The rules of `Thresholds.tau`, for whatever it holds: shape and dtype where it has them (arrays, tracers,
    `ShapeDtypeStruct`s), values where they are concrete. JAX also rebuilds pytrees around placeholders (`object()`,
    None, partition specs), which have neither and pass."""
    if not isinstance(tau, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return
    check_shape(tau.shape, where)
    if not jnp.issubdtype(tau.dtype, jnp.floating):
        raise TypeError(f"{where}: tau must be a float array, got dtype {tau.dtype}")
    if _is_concrete(tau):
        check_values(np.asarray(tau, np.float64), where)


def _is_concrete(tau) -> bool:
    """Whether `tau`'s values can be read here: a NumPy array, or a JAX array that is neither a tracer nor held in
    part by other processes."""
    if isinstance(tau, np.ndarray):
        return True
    return isinstance(tau, jax.Array) and not isinstance(tau, jax.core.Tracer) and tau.is_fully_addressable


def check_shape(shape: tuple, where: str = "Thresholds") -> None:
    """One threshold per layer and q head: `[num_layers, num_q_heads]`, each at least 1."""
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"{where}: tau must be a non-empty [num_layers, num_q_heads] array, got shape {tuple(shape)}")


def check_values(tau: np.ndarray, where: str = "Thresholds") -> None:
    """Every tau is 0 (a dense head), positive, or +inf (a streaming head); NaN and negative values are refused."""
    if np.any(np.isnan(tau)) or np.any(tau < 0):
        raise ValueError(f"{where}: tau must be >= 0 or inf, never NaN (0: a dense head, inf: a streaming head that "
                         f"keeps its sink and local blocks only), got {np.unique(tau[np.isnan(tau) | (tau < 0)])}")
