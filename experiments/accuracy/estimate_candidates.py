r"""Cheaper middle-block estimates for SALE, measured against its full 4-bit estimate before any is built.

    python -m experiments.accuracy.estimate_candidates --seq_len=4096 \
        --output=experiments/results/estimate_candidates/cpu/estimate_candidates.json

(experiments/results/README.md gives the committed study's command.)

Candidates (experiments/lib/estimate_candidates.py), each at every rank r of --ranks, chosen per kv head on a
calibration sample of the same heads (same head_seed, seed + 1) and scored on the evaluation sample:
  channels_r{r}  Double Sparsity's channel subset: r channels, whole rotary pairs;
  pca_r{r}       Loki-style joint Q-K basis: the top r principal directions of stacked q and smoothed k.
Both go through the project's own 4-bit quantizer and SALE's rule: exact sink-local statistics, and a middle block
kept where some reduced estimate exceeds m + log(tau * l). `sale` is the full 4-bit estimate.

Every selection comes from one pass at tau = 1 (margins at tau are those at 1 minus log tau, up to rounding). For
each tau of --taus a candidate is compared with the full estimate at equal density: its uniform tau is chosen so it
keeps exactly as many middle blocks as the full estimate keeps at that tau (the threshold at the candidate's n-th
largest margin), and it reports block recall (the fraction of the full estimate's kept middle blocks it keeps),
needle recall (planted needles whose block is kept) and the per-row L1 error against attention over every visible
block. Adversarial needles: on the same sample without its needles, needles are planted at the same (row, key)s
entirely in the dimensions each family's largest rank drops (so every rank of the family drops them), raising the
needle's score by --strengths times the row's log-sum-exp gap; the full estimate at --adversarial_tau and each
candidate at its density-matched tau report needle recall. Cost: multiply-adds per head of the estimate over the
middle pairs (r/D of the full one) and, for the bases, of projecting q and k.

2:4 structured-sparse codes (`sparse24_q`, `sparse24_k`): each code vector of q (or k) keeps its 2 largest of
every 4 channels, compared at equal density as above; sparse24_q's adversarial needles sit in the q channels the
pruning zeroes in each needle's row.

Certified filter: each basis at each rank bounds the full estimate from above (`certified_bound_margins`); at each
tau it reports the fraction of middle key tiles of --tile_blocks key blocks whose bound exceeds log tau, the tiles
the full estimate would still score. The selection is the full estimate's by construction (checked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import sale_jax
from experiments.lib import estimate_candidates as candidates, flags as common, results, workloads
from experiments.lib.selection_metrics import layout_metrics, needles_kept, scored_pairs
from sale_jax.reference.selection import selection_margins_reference

_SEQ_LEN = common.define_seq_len(4096)
_HEADS = common.HeadFlags.define(q_heads=8, kv_heads=2, head_dim=128)
_DTYPE = common.define_dtype("auto")
_SALE = common.SaleFlags.define(backend=None, block_q=64)
_TAUS = common.define_numbers("taus", [0.1, 0.03, 0.008, 0.002, 0.0005], "Uniform SALE thresholds of the full "
                              "estimate; candidates are matched to each one's density.")
_RANKS = common.define_numbers("ranks", [16, 32, 64], "Ranks r of the reduced estimates (even, <= head_dim).",
                               kind=int)
_STRENGTHS = common.define_numbers("strengths", [0.25, 0.5, 1.0, 2.0], "Adversarial needle strengths: multiples "
                                   "of the row's log-sum-exp gap added to the needle's score in dropped dims.")
_ADVERSARIAL_TAU = flags.DEFINE_float("adversarial_tau", 0.008, "Full estimate's tau for the adversarial needles "
                                      "(candidates at their density-matched tau).")
_TILE_BLOCKS = common.define_numbers("tile_blocks", [1, 4, 8], "Key blocks per tile for the certified filter's "
                                     "count of tiles that still need the full estimate.", kind=int)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the evaluated sample (calibration uses seed + 1).")
_OUTPUT = common.define_output()

FAMILIES = {"channels": candidates.channel_subset_basis, "pca": candidates.joint_pca_basis}
# 2:4 structured-sparse codes of q or of k (no basis, no rank): half the channels of each vector, at the sparse
# wgmma's twice-dense rate.
STRUCTURED_SPARSE = ("q", "k")


def method_name(family: str, rank: int) -> str:
    return family if family == "sale" or family.startswith("sparse24") else f"{family}_r{rank}"


def _check_flags(head_dim: int) -> None:
    if not _TAUS.value or min(_TAUS.value) <= 0:
        raise ValueError(f"--taus must be positive and not empty, got {_TAUS.value}")
    if not _RANKS.value or any(r <= 0 or r > head_dim or r % 2 for r in _RANKS.value):
        raise ValueError(f"--ranks must be even and in (0, head_dim={head_dim}], got {_RANKS.value}")
    if _ADVERSARIAL_TAU.value <= 0:
        raise ValueError(f"--adversarial_tau must be positive, got {_ADVERSARIAL_TAU.value}")
    if any(s < 0 for s in _STRENGTHS.value):
        raise ValueError(f"--strengths must be >= 0, got {_STRENGTHS.value}")
    if not _TILE_BLOCKS.value or min(_TILE_BLOCKS.value) < 1:
        raise ValueError(f"--tile_blocks must be positive and not empty, got {_TILE_BLOCKS.value}")


def _matched_log_tau(margins: np.ndarray, middle: np.ndarray, count: int) -> float:
    """The log tau at which `margins > log tau` keeps `count` of the `middle` blocks (fewer on ties)."""
    ranked = np.sort(margins[middle])[::-1]
    return float(ranked[count]) if count < ranked.size else -np.inf


def main(argv):
    del argv
    dtype = common.resolve_dtype(_DTYPE.value)
    q_heads, kv_heads, head_dim = _HEADS.values()
    _check_flags(head_dim)
    shape = (1, _SEQ_LEN.value, q_heads, kv_heads, head_dim)
    work = workloads.llm_like_qkv(_SEED.value, *shape, dtype=dtype, head_seed=_SEED.value)
    calibration = workloads.llm_like_qkv(_SEED.value + 1, *shape, dtype=dtype, head_seed=_SEED.value)
    q, k, v = work.q, work.k, work.v
    config = _SALE.config(backend="reference", dense_below=0)
    grid = sale_jax.BlockGrid(_SEQ_LEN.value, _SEQ_LEN.value, config.block_q, config.block_k)
    dense = sale_jax.block_sparse_attention(q, k, v, sale_jax.BlockLayout.all_visible(1, q_heads, grid), config)

    always = grid.regions(config.sink_tokens, config.local_tokens).always_kept
    middle = np.broadcast_to(grid.visible_mask & ~always, (1, q_heads, *always.shape))
    middle_pairs, _ = scored_pairs(grid, config)
    ones = jnp.ones((q_heads,), jnp.float32)

    def full_margins(keys):
        return np.asarray(selection_margins_reference(q, keys, ones, config)[1])

    def mask_at(margins, log_tau):
        return np.asarray(always)[None, None] | (margins > log_tau)

    bases = {(family, rank): choose(calibration.q, calibration.k, rank)
             for family, choose in FAMILIES.items() for rank in _RANKS.value}
    margins = {("sale", head_dim): full_margins(k)}
    margins |= {key: np.asarray(candidates.reduced_margins(q, k, basis, config)) for key, basis in bases.items()}
    margins |= {(f"sparse24_{operand}", head_dim // 2): np.asarray(
        candidates.structured_sparse_margins(q, k, config, operand)) for operand in STRUCTURED_SPARSE}

    def cost(family, rank):
        macs = {"estimate_macs": middle_pairs * rank, "estimate_fraction_of_full": rank / head_dim}
        if family == "pca":
            macs["projection_macs"] = (grid.q_len + grid.kv_len) * head_dim * rank
        return macs

    def full_count(tau):
        """The middle blocks the full estimate keeps at `tau`."""
        return int((mask_at(margins[("sale", head_dim)], np.log(tau)) & middle).sum())

    def matched_log_tau(family, rank, tau, count):
        """The candidate's log tau keeping `count` middle blocks, the full estimate's at `tau` (log tau itself for
        the full one)."""
        if family == "sale":
            return np.log(tau)
        return _matched_log_tau(margins[(family, rank)], middle, count)

    def density(mask):
        return float(sale_jax.BlockLayout.from_mask(jnp.asarray(mask), grid).density())

    points = []
    for tau in _TAUS.value:
        full_mask = mask_at(margins[("sale", head_dim)], np.log(tau))
        count = full_count(tau)
        for (family, rank), margin in margins.items():
            log_tau = matched_log_tau(family, rank, tau, count)
            mask = mask_at(margin, log_tau)
            layout = sale_jax.BlockLayout.from_mask(jnp.asarray(mask), grid)
            out = sale_jax.block_sparse_attention(q, k, v, layout, config)
            point = {"method": method_name(family, rank), "family": family,
                     "rank": rank, "full_tau": tau, "tau": float(np.exp(log_tau)),
                     "block_recall": float((mask & full_mask & middle).sum() / max(count, 1)),
                     "same_tau_density": density(mask_at(margin, np.log(tau)))}
            point.update(layout_metrics(out, dense, layout, work.needle_rows, work.needle_keys, config))
            point.update(cost(family, rank))
            points.append(point)
            print(f"{point['method']:<12} full tau {tau:<7} density {point['density']:.3f}  block recall "
                  f"{point['block_recall']:.3f}  L1/row {point['l1_per_row']:.4f}  needles "
                  f"{point['needle_recall']:.2f}", flush=True)

    certified = []
    full_density = {tau: density(mask_at(margins[("sale", head_dim)], np.log(tau))) for tau in _TAUS.value}
    for (family, rank), basis in bases.items():
        bound = np.asarray(candidates.certified_bound_margins(q, k, basis, config))
        for tau in _TAUS.value:
            kept = mask_at(margins[("sale", head_dim)], np.log(tau)) & middle
            # f32 rounding of the projected dots aside (1e-3 in logits), the bound keeps what the full estimate keeps.
            if not np.all(bound[kept] >= margins[("sale", head_dim)][kept] - 1e-3):
                raise AssertionError(f"{family}_r{rank}'s bound falls below the full estimate at tau {tau}")
            row = {"method": f"{family}_r{rank}", "family": family, "rank": rank, "full_tau": tau,
                   "density": full_density[tau],
                   "bound_fraction_of_full": (rank + 1) / head_dim,
                   "tiles_needing_full_estimate": {
                       str(blocks * config.block_k): candidates.tiles_needing_estimate(bound, middle, np.log(tau),
                                                                                      blocks)
                       for blocks in _TILE_BLOCKS.value}}
            certified.append(row)
            print(f"certified {row['method']:<12} full tau {tau:<7} density {row['density']:.3f}  tiles needing "
                  "the full estimate " + "  ".join(f"{keys} keys {fraction:.3f}" for keys, fraction
                                                   in row["tiles_needing_full_estimate"].items()), flush=True)

    # Adversarial needles: the sample's own needles removed, new ones planted where each family looks least.
    plain_k = workloads.llm_like_qkv(_SEED.value, *shape, dtype=dtype, head_seed=_SEED.value, num_needles=0).k
    scale = config.softmax_scale(head_dim)
    adversarial = []
    tau = _ADVERSARIAL_TAU.value
    adversarial_count = full_count(tau)
    # Per family: where its needles are planted, and each of its members' margins on the planted keys.
    planted = {family: (f"outside {family} r{max(_RANKS.value)}",
                        candidates.outside_basis(bases[(family, max(_RANKS.value))]),
                        {(family, rank): functools.partial(candidates.reduced_margins, basis=bases[(family, rank)])
                         for rank in _RANKS.value})
               for family in FAMILIES}
    planted["sparse24_q"] = ("in the q channels 2:4 prunes",
                             candidates.outside_structured_sparse(q, k, work.needle_rows, config),
                             {("sparse24_q", head_dim // 2): functools.partial(
                                 candidates.structured_sparse_margins, operand="q")})
    for family, (where, dropped_of, members) in planted.items():
        for strength in _STRENGTHS.value:
            keys = candidates.adversarial_needle_keys(q, plain_k, work.needle_rows, work.needle_keys, dropped_of,
                                                      strength, scale)
            row = {"family": family, "planted": where, "strength": strength,
                   "needle_recall": {"sale": float(needles_kept(mask_at(full_margins(keys), np.log(tau)),
                                                                work.needle_rows, work.needle_keys, config).mean())}}
            for (member, rank), member_margins in members.items():
                log_tau = matched_log_tau(member, rank, tau, adversarial_count)
                reduced = np.asarray(member_margins(q, keys, config=config))
                row["needle_recall"][method_name(member, rank)] = float(needles_kept(
                    mask_at(reduced, log_tau), work.needle_rows, work.needle_keys, config).mean())
            adversarial.append(row)
            print(f"adversarial {family:<9} strength {strength:<5} needle recall "
                  + "  ".join(f"{name} {value:.2f}" for name, value in row["needle_recall"].items()), flush=True)

    plot = results.plot_path(_OUTPUT.value)
    results.write(_OUTPUT.value, {
        "shape": {"batch": 1, "seq_len": _SEQ_LEN.value, "q_heads": q_heads, "kv_heads": kv_heads,
                  "head_dim": head_dim, "dtype": dtype.name},
        "seed": _SEED.value, "density_matching": "exact kept middle-block count (candidate tau at its n-th margin)",
        "quantization": "4-bit codes of the projected q and k (quantize_reference)",
        "full_estimate_macs": middle_pairs * head_dim, "adversarial_tau": tau,
        "channels": {f"r{rank}": np.asarray(jnp.argmax(bases[("channels", rank)], axis=1)).tolist()
                     for rank in _RANKS.value},
        "points": points, "adversarial": adversarial, "certified": certified}, config, files=[plot])
    _plot(points, adversarial, plot)


def _plot(points, adversarial, path):
    plt = results.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in dict.fromkeys(p["method"] for p in points):
        pts = sorted((p["density"], max(p["l1_per_row"], 1e-6)) for p in points if p["method"] == method)
        left.plot(*zip(*pts), marker="o", label=method, linestyle="-" if method == "sale" else "--")
    left.set_xlabel("density of kept blocks")
    left.set_ylabel("per-row L1 error vs all visible blocks")
    left.set_yscale("log")
    left.set_title("at equal density")
    for family in dict.fromkeys(row["family"] for row in adversarial):
        rows = [row for row in adversarial if row["family"] == family]
        for name in rows[0]["needle_recall"]:
            label = f"sale (needles {rows[0]['planted']})" if name == "sale" else name
            right.plot([row["strength"] for row in rows], [row["needle_recall"][name] for row in rows],
                       marker="o", label=label, linestyle="-" if name == "sale" else "--")
    right.set_xlabel("adversarial needle strength (x the row's log-sum-exp gap)")
    right.set_ylabel("needle recall")
    right.set_title("needles planted in the dropped dimensions")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    results.save_figure(fig, path, "reduced estimates against SALE's 4-bit estimate")


if __name__ == "__main__":
    app.run(main)
