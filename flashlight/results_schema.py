"""The results table's schema, shared by its writer (the runner) and its readers (reports, merges).

Its own module so that the runner and the report both read it and neither imports the other for it.
"""
from __future__ import annotations

import torch

COLUMNS = ["variant", "backend", "mode", "dtype", "device", "B", "H", "Sq", "Sk", "D", "Dv", "ms", "tflops",
           "rel_err", "status", "reason", "peak_mem_mb", "compile_s", "torch", "triton", "gpu", "params",
           "config", "prep_ms", "per_batch_ms", "grad_rel_err", "gpu_index", "step_mem_mb"]
# config: the flashlight tile config(s) launched (JSON); prep_ms: the backend's one-off preparation for the
# case (FlexAttention's create_block_mask, SDPA's materialised mask/bias; flashlight's data-mask tile
# classification, as per_batch_ms - ms), timed apart from ms, empty where it prepares nothing;
# per_batch_ms: preparation + call with the mask inputs new every call (document ids), for variants whose
# mask changes every batch; grad_rel_err (mode=fwdbwd): the relative error of every gradient, {input name:
# error} as JSON (rel_err is the largest of the output's and these); gpu_index: the physical GPU (its
# CUDA_VISIBLE_DEVICES entry) the job held -- on device cuda the one that measured the row, with its name
# in `gpu`; empty where the job was given no GPU; step_mem_mb (GPU): what one call needs at its peak, its
# inputs and prepared masks included, measured on a call of its own (peak_mem_mb is the most the process
# held during the timed calls: the references and anything earlier cases left count there too). New
# columns go last so that older readers keep working.


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """The largest relative error (against the reference) at which a row's status is ok."""
    if dtype in (torch.bfloat16, torch.float16):
        return 2e-2
    return 1e-3 if device.type == "cuda" else 1e-4
