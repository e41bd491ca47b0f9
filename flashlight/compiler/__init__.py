"""The compiler: attention written in plain PyTorch, fused into one Triton kernel inside torch.compile.

Stages, in pipeline order:

    capture   - normalise the graph torch.compile hands over into a small aten vocabulary
    analysis  - find attention regions (Q·Kᵀ → elementwise/reductions → ·V) and give every value its axes
    rewrite   - turn a region's dependent reductions into their online form (one pass over key tiles)
    sparsity  - prove which key tiles a -inf mask removes, and emit the tile-skipping test
    codegen   - emit the region's Triton kernel source (training: it also stores the per-row state)
    late      - the backward's row step: the forward's after-the-loop lines run again in PyTorch, and
                differentiated by torch.autograd
    backward  - the backward's tile kernels: the score program recomputed and differentiated op by op
    runtime   - load, configure and launch the generated kernels through the custom ops (and their autograd)
    choose    - on a graph's first call on a GPU, time it against Inductor's unfused version; run the faster

    backend   - the torch.compile backend (``backend="flashlight"``) that runs the stages over a graph
    explain   - the report of what was fused and why not, for users

indexing holds the view-chain index algebra that analysis, rewrite, sparsity and codegen share.
"""
