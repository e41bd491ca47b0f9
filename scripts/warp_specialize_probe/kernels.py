"""A minimal FlashAttention forward (no masks; attn_desc_causal: a causal one in two loops), loaded with
pointers or with on-device tensor descriptors, its key loop optionally warp-specialised (WS)."""
import triton
import triton.language as tl


@triton.jit
def _step(q, k, v, acc, m_i, l_i, qk_scale):
    qk = tl.dot(q, k)
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_ij, l_i


@triton.jit
def attn_desc(Q, K, V, O, sm_scale, ZH, N_CTX: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    rows = ZH * N_CTX
    dq = tl.make_tensor_descriptor(Q, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
    dk = tl.make_tensor_descriptor(K, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    dv = tl.make_tensor_descriptor(V, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    do = tl.make_tensor_descriptor(O, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
    row0 = off_hz * N_CTX
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    q = dq.load([row0 + start_m * BLOCK_M, 0])
    for start_n in tl.range(0, N_CTX, BLOCK_N, warp_specialize=WS):
        k = dk.load([row0 + start_n, 0]).T
        v = dv.load([row0 + start_n, 0])
        acc, m_i, l_i = _step(q, k, v, acc, m_i, l_i, qk_scale)
    acc = acc / l_i[:, None]
    do.store([row0 + start_m * BLOCK_M, 0], acc.to(O.dtype.element_ty))


@triton.jit
def attn_ptr(Q, K, V, O, sm_scale, ZH, N_CTX: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    base = off_hz.to(tl.int64) * N_CTX * HEAD_DIM
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    for start_n in tl.range(0, N_CTX, BLOCK_N, warp_specialize=WS):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + base + offs_n[None, :] * HEAD_DIM + offs_d[:, None])
        v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
        acc, m_i, l_i = _step(q, k, v, acc, m_i, l_i, qk_scale)
    acc = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(O.dtype.element_ty))


@triton.jit
def attn_desc_causal(Q, K, V, O, sm_scale, ZH, N_CTX: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    rows = ZH * N_CTX
    dq = tl.make_tensor_descriptor(Q, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
    dk = tl.make_tensor_descriptor(K, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    dv = tl.make_tensor_descriptor(V, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    do = tl.make_tensor_descriptor(O, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
    row0 = off_hz * N_CTX
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    q = dq.load([row0 + start_m * BLOCK_M, 0])
    for start_n in tl.range(0, start_m * BLOCK_M, BLOCK_N, warp_specialize=WS):
        k = dk.load([row0 + start_n, 0]).T
        v = dv.load([row0 + start_n, 0])
        acc, m_i, l_i = _step(q, k, v, acc, m_i, l_i, qk_scale)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(start_m * BLOCK_M, (start_m + 1) * BLOCK_M, BLOCK_N):
        k = dk.load([row0 + start_n, 0]).T
        v = dv.load([row0 + start_n, 0])
        qk = tl.dot(q, k)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    acc = acc / l_i[:, None]
    do.store([row0 + start_m * BLOCK_M, 0], acc.to(O.dtype.element_ty))
