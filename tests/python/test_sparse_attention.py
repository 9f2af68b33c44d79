"""bench/sparse_attention.py: the Triton paged decode kernel and the repack + sdpa path agree with
an fp32 torch reference. On a machine without a GPU the kernel runs in Triton's interpreter
(TRITON_INTERPRET=1, set here before the kernel module is imported) on tiny shapes; without
triton, or where the interpreter cannot run it, the test skips."""
import importlib
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    # Before triton's first import: its own library functions are decorated then.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kernels():
    on_gpu = torch.cuda.is_available()
    sys.path.insert(0, str(REPO / "bench"))
    try:
        module = importlib.import_module("sparse_attention")
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module, ("cuda" if on_gpu else "cpu")


def _case(device, batch, num_q_heads, num_kv_heads, head_dim, block_size, pages, tail_len,
          seed=0):
    generator = torch.Generator().manual_seed(seed)
    pool_pages = batch * pages + 3  # spare pages the tables never name
    pool = torch.randn((pool_pages, 2, block_size, num_kv_heads, head_dim), generator=generator)
    query = torch.randn((batch, num_q_heads, head_dim), generator=generator)
    # Each sequence reads a scattered, out-of-order subset of the pool, its tail page last.
    order = torch.randperm(pool_pages, generator=generator)[:batch * pages]
    table = order.view(batch, pages).to(torch.int32)
    count = torch.full((batch,), pages, dtype=torch.int32)
    tail = torch.tensor(tail_len, dtype=torch.int32)
    # Triton's CPU interpreter mishandles bf16 (seen with triton 3.9): fp16 there, bf16 on GPUs.
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    return (query.to(dtype).to(device), pool.to(dtype).to(device), table.to(device),
            count.to(device), tail.to(device))


@pytest.mark.parametrize("shape", [
    # batch, q heads, KV heads, head dim, block, pages, tail lengths
    (2, 4, 2, 16, 16, [1, 16]),    # tail of one token / a full tail page
    (1, 5, 1, 32, 32, [7]),        # a group of 5 (Qwen2.5-14B's 40/8), one page only
    (3, 8, 2, 16, 32, [3, 32, 17]),
])
@pytest.mark.parametrize("pages", [1, 3])
def test_paged_kernel_matches_reference(kernels, shape, pages):
    module, device = kernels
    batch, num_q_heads, num_kv_heads, head_dim, block_size, tails = shape
    query, pool, table, count, tail = _case(device, batch, num_q_heads, num_kv_heads, head_dim,
                                            block_size, pages, tails)
    scale = head_dim ** -0.5
    expected = module.reference_attention(query.cpu(), pool.cpu(), table.cpu(), count.cpu(),
                                          tail.cpu(), scale)
    for splits in (1, 2, 5):
        try:
            got = module.paged_decode_attention(query, pool, table, count, tail, scale,
                                                num_splits=splits)
        except Exception as error:  # an interpreter that cannot run the kernel
            if device == "cpu":
                pytest.skip(f"Triton's interpreter cannot run the kernel here: {error}")
            raise
        torch.testing.assert_close(got.float().cpu(), expected.float(), atol=2e-2, rtol=2e-2)


def test_shorter_tables_ignore_pages_past_their_count(kernels):
    module, device = kernels
    query, pool, table, count, tail = _case(device, 2, 4, 2, 16, 16, 3, [5, 9])
    count = torch.tensor([2, 3], dtype=torch.int32, device=device)
    scale = 0.25
    expected = module.reference_attention(query.cpu(), pool.cpu(), table.cpu(), count.cpu(),
                                          tail.cpu(), scale)
    got = module.paged_decode_attention(query, pool, table, count, tail, scale, num_splits=2)
    torch.testing.assert_close(got.float().cpu(), expected.float(), atol=2e-2, rtol=2e-2)


def test_repack_sdpa_matches_reference(kernels):
    module, device = kernels
    query, pool, table, count, tail = _case(device, 3, 8, 2, 16, 32, 3, [3, 32, 17])
    scale = 0.25
    expected = module.reference_attention(query.cpu(), pool.cpu(), table.cpu(), count.cpu(),
                                          tail.cpu(), scale)
    got = module.repack_sdpa_attention(query, pool, table, count, tail, scale)
    torch.testing.assert_close(got.float().cpu(), expected.float(), atol=2e-2, rtol=2e-2)
