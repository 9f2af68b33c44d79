"""Paged decode attention over a slot pool, for bench/decode_bench.py.

The pool holds pages (one block of one layer of one sequence each) laid out as the client
library's slots: pool[page] = K then V, each [block_size][num_kv_heads][head_dim]. A decode step of
one layer reads, per sequence b, the pages table[b, :count[b]]; the last of them is the sequence's
tail page (the tokens after its last complete block), of which only tail_len[b] tokens are valid.
Full attention is the same call with every block of the sequence in its table.

Three implementations of the same contract:
  paged_decode_attention  Triton: split-K over the table (flash-decoding), reading the pages in
                          place through the table; a second kernel merges the splits.
  repack_sdpa_attention   torch: gathers the table's pages into a contiguous copy, then sdpa.
  reference_attention     torch, fp32, one sequence at a time: the test's reference.
Queries are [batch][num_q_heads][head_dim]; query head j reads KV head j // (num_q_heads /
num_kv_heads) (grouped-query attention). Output [batch][num_q_heads][head_dim], queries' dtype.
"""
import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_split(q_ptr, pool_ptr, table_ptr, count_ptr, tail_len_ptr, part_acc_ptr,
                        part_lse_ptr, scale_log2e, table_stride, page_stride,
                        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                        NUM_SPLITS: tl.constexpr):
    # One program: one (sequence, KV head) and one split of its table, all GROUP query heads.
    seq_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = seq_head // NUM_KV_HEADS
    kv_head = seq_head % NUM_KV_HEADS
    count = tl.load(count_ptr + seq)
    tail_len = tl.load(tail_len_ptr + seq)
    tiles_per_page: tl.constexpr = BLOCK_SIZE // TILE
    total_tiles = count * tiles_per_page
    tiles_per_split = tl.cdiv(total_tiles, NUM_SPLITS)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, total_tiles)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    tokens = tl.arange(0, TILE)
    q_rows = seq * NUM_KV_HEADS * GROUP + kv_head * GROUP + rows
    q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + dims[None, :], mask=rows[:, None] < GROUP,
                other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    token_stride: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
    for tile in range(first, last):
        index = tile // tiles_per_page
        page = tl.load(table_ptr + seq * table_stride + index).to(tl.int64)
        in_page = (tile % tiles_per_page) * TILE + tokens
        valid = tl.where(index == count - 1, tail_len, BLOCK_SIZE)
        live = in_page < valid
        base = pool_ptr + page * page_stride + kv_head * HEAD_DIM
        offsets = in_page[:, None] * token_stride + dims[None, :]
        k = tl.load(base + offsets, mask=live[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2e  # [GROUP_PAD, TILE], log2 units
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(base + BLOCK_SIZE * token_stride + offsets, mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
    part_rows = (seq * NUM_KV_HEADS * GROUP + kv_head * GROUP + rows) * NUM_SPLITS + split
    row_ok = rows < GROUP
    tl.store(part_acc_ptr + part_rows[:, None] * HEAD_DIM + dims[None, :], out,
             mask=row_ok[:, None])
    tl.store(part_lse_ptr + part_rows, lse, mask=row_ok)


@triton.jit
def _merge_splits(part_acc_ptr, part_lse_ptr, out_ptr, HEAD_DIM: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    row = tl.program_id(0)  # (sequence, query head)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    ok = splits < NUM_SPLITS
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + splits, mask=ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.where(ok & (lse > float("-inf")), tl.exp2(lse - top), 0.0)
    acc = tl.load(part_acc_ptr + (row * NUM_SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :],
                  mask=ok[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def default_splits(batch, num_kv_heads, max_pages, block_size, tile=64, num_sms=132):
    """Enough splits to give every multiprocessor about two programs, none shorter than a tile."""
    want = max(1, math.ceil(2 * num_sms / max(batch * num_kv_heads, 1)))
    return max(1, min(want, max_pages * (block_size // tile), 128))


class PagedDecodeAttention:
    """Preallocated split buffers for one (batch, heads, splits) shape, so that calls can be
    captured in a CUDA graph. Call with (query, pool, table, count, tail_len, scale)."""

    def __init__(self, batch, num_q_heads, num_kv_heads, head_dim, block_size, num_splits,
                 device, dtype=torch.bfloat16, tile=64, num_warps=4, num_stages=2):
        self.batch, self.num_q_heads, self.num_kv_heads = batch, num_q_heads, num_kv_heads
        self.head_dim, self.block_size, self.num_splits = head_dim, block_size, num_splits
        self.tile = min(tile, block_size)
        self.num_warps, self.num_stages = num_warps, num_stages
        self.group = num_q_heads // num_kv_heads
        self.part_acc = torch.empty((batch * num_q_heads * num_splits, head_dim),
                                    dtype=torch.float32, device=device)
        self.part_lse = torch.empty((batch * num_q_heads * num_splits,), dtype=torch.float32,
                                    device=device)
        self.out = torch.empty((batch, num_q_heads, head_dim), dtype=dtype, device=device)

    def __call__(self, query, pool, table, count, tail_len, scale):
        group_pad = max(16, triton.next_power_of_2(self.group))
        _paged_decode_split[(self.batch * self.num_kv_heads, self.num_splits)](
            query, pool, table, count, tail_len, self.part_acc, self.part_lse,
            scale * _LOG2E, table.stride(0), pool.stride(0),
            NUM_KV_HEADS=self.num_kv_heads, GROUP=self.group, GROUP_PAD=group_pad,
            HEAD_DIM=self.head_dim, BLOCK_SIZE=self.block_size, TILE=self.tile,
            NUM_SPLITS=self.num_splits, num_warps=self.num_warps, num_stages=self.num_stages)
        _merge_splits[(self.batch * self.num_q_heads,)](
            self.part_acc, self.part_lse, self.out, HEAD_DIM=self.head_dim,
            NUM_SPLITS=self.num_splits, SPLITS_PAD=triton.next_power_of_2(self.num_splits),
            num_warps=1)
        return self.out


def paged_decode_attention(query, pool, table, count, tail_len, scale, num_splits=None):
    """One-off call of the Triton path (allocates its split buffers)."""
    batch, num_q_heads, head_dim = query.shape
    _, two, block_size, num_kv_heads, _ = pool.shape
    assert two == 2 and table.dtype == torch.int32 and count.dtype == torch.int32
    if num_splits is None:
        num_splits = default_splits(batch, num_kv_heads, table.shape[1], block_size)
    run = PagedDecodeAttention(batch, num_q_heads, num_kv_heads, head_dim, block_size,
                               num_splits, query.device, query.dtype)
    return run(query, pool, table, count, tail_len, scale).clone()


def repack_sdpa_attention(query, pool, table, count, tail_len, scale):
    """Gathers every sequence's table.shape[1] pages into contiguous K/V, masks the tail page past
    tail_len, and runs sdpa. REQUIRES: every count equals table.shape[1] (a uniform batch)."""
    batch, num_q_heads, head_dim = query.shape
    pages = table.shape[1]
    _, _, block_size, num_kv_heads, _ = pool.shape
    gathered = pool.index_select(0, table.reshape(-1).long())
    gathered = gathered.view(batch, pages, 2, block_size, num_kv_heads, head_dim)
    k = gathered[:, :, 0].permute(0, 3, 1, 2, 4).reshape(batch, num_kv_heads,
                                                           pages * block_size, head_dim)
    v = gathered[:, :, 1].permute(0, 3, 1, 2, 4).reshape(batch, num_kv_heads,
                                                           pages * block_size, head_dim)
    position = torch.arange(pages * block_size, device=query.device)
    limit = (pages - 1) * block_size + tail_len.to(position.dtype)  # [batch]
    mask = (position[None, :] < limit[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, None], k, v, attn_mask=mask, scale=scale,
        enable_gqa=num_q_heads != num_kv_heads)
    return out[:, :, 0]


def reference_attention(query, pool, table, count, tail_len, scale):
    """fp32 softmax attention of each sequence over its pages, one sequence at a time."""
    batch, num_q_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = pool.shape
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(query)
    for b in range(batch):
        n = int(count[b])
        pages = pool[table[b, :n].long()].float()  # [n, 2, bs, Hkv, D]
        k = pages[:, 0].reshape(n * block_size, num_kv_heads, head_dim)
        v = pages[:, 1].reshape(n * block_size, num_kv_heads, head_dim)
        valid = (n - 1) * block_size + int(tail_len[b])
        k, v = k[:valid].repeat_interleave(group, 1), v[:valid].repeat_interleave(group, 1)
        scores = torch.einsum("hd,thd->ht", query[b].float(), k) * scale
        out[b] = torch.einsum("ht,thd->hd", torch.softmax(scores, -1), v).to(query.dtype)
    return out
