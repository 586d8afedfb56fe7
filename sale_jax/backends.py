"""The kernel backends by name: the one map from a `SaleConfig.backend` that names kernels to the module that runs
them (each gives `unsupported`, `unsupported_block_sizes`, `select_blocks` and `block_sparse_attention`)."""

from __future__ import annotations

from sale_jax import mosaic_gpu_backend, triton_backend

KERNEL_MODULES = {"triton": triton_backend, "mosaic_gpu": mosaic_gpu_backend}
