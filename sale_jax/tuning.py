"""The kernels' launch choices per device: one `KernelTuning` table each. The Hopper table's entries were chosen by
timing the alternatives on the H200; the figures and the alternatives that lost are in docs/tuning.md, which each
entry links to.

Shape limits (what a kernel can run at all) are not tuning: they live beside the kernels and their backends.
"""

from __future__ import annotations

import dataclasses

import jax

# The SaleConfig default: the kernels run fastest at 128 query rows a block, and a calibrated model's retrieval
# accuracy there matched dense attention (docs/tuning.md#block-q).
DEFAULT_BLOCK_Q = 128
# dense_below for the backends and block sizes a table does not list (docs/tuning.md#dense-below)
DEFAULT_DENSE_BELOW = 65536


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    """Launch choices of the Triton and Mosaic GPU kernels on one kind of device.

    Attributes:
      device: the devices the table is for.
      triton_estimate_tile: keys per low-bit estimate tile of the Triton selection kernel (a multiple of block_k).
      triton_selection_warps, triton_selection_stages: its `num_warps` and `num_stages`.
      triton_attention_warps, triton_attention_stages: the Triton computation kernel's.
      dense_below: `((backend, block_q, key_length), ...)`: where SALE at the default threshold starts to beat
        dense attention; `SaleConfig.dense_below=None` resolves to it (DEFAULT_DENSE_BELOW where not listed).
      mosaic_estimate_stages: key tiles in flight in the one-warpgroup Mosaic GPU estimate.
      mosaic_split_rows_from: key length from which the estimate at block_q 128 runs the split-rows kernel (two
        64-row warpgroups fed by a TMA warpgroup).
      mosaic_split_rows_stages: key tiles in flight in the split-rows kernel.
      mosaic_sparse_q_heads_per_cta: q heads of one kv head per CTA of the one-warpgroup estimate when its q codes
        are 2:4-sparse (the heads share each key tile's codes); 1 where the GQA group does not divide by it.
      mosaic_attention_keys_per_step: keys of kept blocks the Mosaic GPU computation pass gathers per step.
      mosaic_attention_stages: its steps of K/V tiles in flight.
      The mosaic_* entries are None on devices without the Mosaic GPU kernels (they need Hopper).
    """

    device: str
    triton_estimate_tile: int
    triton_selection_warps: int
    triton_selection_stages: int
    triton_attention_warps: int
    triton_attention_stages: int
    dense_below: tuple[tuple[str, int, int], ...]
    mosaic_estimate_stages: int | None = None
    mosaic_split_rows_from: int | None = None
    mosaic_split_rows_stages: int | None = None
    mosaic_sparse_q_heads_per_cta: int | None = None
    mosaic_attention_keys_per_step: int | None = None
    mosaic_attention_stages: int | None = None

    def dense_below_for(self, backend: str, block_q: int) -> int:
        """The key length from which `backend` at `block_q` runs SALE rather than dense attention by default."""
        for listed_backend, listed_block_q, length in self.dense_below:
            if (listed_backend, listed_block_q) == (backend, block_q):
                return length
        return DEFAULT_DENSE_BELOW


HOPPER = KernelTuning(
    device="NVIDIA H200 (Hopper, sm_90)",
    # int8 dots run the tensor cores better at 128 keys than at 64 or 256: docs/tuning.md#triton-selection
    triton_estimate_tile=128,
    # 8 warps were slower for every variant: docs/tuning.md#triton-selection
    triton_selection_warps=4,
    # two stages beat three at 32K and 128K keys: docs/tuning.md#triton-selection
    triton_selection_stages=2,
    # 8 warps, and 3 or 4 stages, were slower: docs/tuning.md#triton-computation
    triton_attention_warps=4,
    triton_attention_stages=2,
    # the shortest key length where SALE at tau 0.008 beat cuDNN: docs/tuning.md#dense-below
    dense_below=(("mosaic_gpu", 128, 16384), ("mosaic_gpu", 64, 65536), ("triton", 128, 65536),
                 ("triton", 64, 65536)),
    # two tiles in flight leave room for more CTAs per SM than three: docs/tuning.md#estimate-stages
    mosaic_estimate_stages=2,
    # split rows win from 64K keys and lose at 32K: docs/tuning.md#estimate-split-rows
    mosaic_split_rows_from=65536,
    # two stages cannot feed two 256-key consumers; four gain nothing over three: docs/tuning.md#estimate-split-rows
    mosaic_split_rows_stages=3,
    # two q heads per CTA beat one (and four, and the split rows in clusters) at 32K and 128K keys:
    # docs/tuning.md#estimate-floor
    mosaic_sparse_q_heads_per_cta=2,
    # 128-key steps, two in flight, beat 64-key steps and three stages: docs/tuning.md#mosaic-computation
    mosaic_attention_keys_per_step=128,
    mosaic_attention_stages=2,
)

# Every other device: the Triton kernels with the H200's choices, which were not timed there, and no crossover
# timed there either, so dense_below resolves to DEFAULT_DENSE_BELOW (docs/tuning.md#other-devices).
OTHER_DEVICES = KernelTuning(
    device="any device but Hopper (untimed: the H200's Triton choices)",
    triton_estimate_tile=HOPPER.triton_estimate_tile,
    triton_selection_warps=HOPPER.triton_selection_warps,
    triton_selection_stages=HOPPER.triton_selection_stages,
    triton_attention_warps=HOPPER.triton_attention_warps,
    triton_attention_stages=HOPPER.triton_attention_stages,
    dense_below=(),
)


def on_hopper() -> bool:
    """Whether JAX's default device is an sm_90 GPU, where the Mosaic GPU kernels (wgmma, TMA) run."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "").startswith("9.")


def for_backend(backend: str) -> KernelTuning:
    """The table a call of `backend` launches with: the Mosaic GPU kernels exist for Hopper only (interpret mode
    stands in for it on other machines), so `mosaic_gpu` always takes the Hopper table; the others take the
    table of JAX's default device."""
    return HOPPER if backend == "mosaic_gpu" or on_hopper() else OTHER_DEVICES
