"""The transformers integration against a real storage node, with the real SmolLM2-135M-Instruct
(fetched by eval/fetch_models.sh into .cache/models/smollm2): on the CPU and the host backend (CI),
or with KVSTAR_TEST_DEVICE=cuda on the GPU and the CUDA backend (the GPU machine)."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "client" / "python"))
MODEL_DIR = Path(os.environ.get("KVSTAR_SMOLLM2_DIR", REPO / ".cache" / "models" / "smollm2"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEVICE = os.environ.get("KVSTAR_TEST_DEVICE", "cpu")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import kvstar  # noqa: E402
import kvstar.hf as kvhf  # noqa: E402
import kvstar.node  # noqa: E402


@pytest.fixture(scope="module")
def model_and_tokenizer():
    if not (MODEL_DIR / GGUF).exists():
        pytest.skip(f"no model at {MODEL_DIR / GGUF} (run eval/fetch_models.sh smollm2)")
    kvhf.install()
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, gguf_file=GGUF, dtype=torch.float32, attn_implementation=kvhf.ATTENTION_NAME)
    return model.to(DEVICE), tokenizer


@pytest.fixture(scope="module")
def client():
    try:
        kvstar.node.find_server()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    backend = kvstar.BACKEND_CUDA if DEVICE == "cuda" else kvstar.BACKEND_HOST
    with kvhf.StorageNode() as node, kvstar.Client(node.address, backend=backend) as connected:
        yield connected


def prompt_ids(tokenizer, characters):
    text = (REPO / "README.md").read_text()[:characters]  # real English text, always at hand
    messages = [{"role": "user", "content": text + "\n\nWhat does the storage node do?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return (ids if torch.is_tensor(ids) else ids["input_ids"]).to(DEVICE)


def expect_same_greedy_tokens(model, tokenizer, client, sequence_id, ids, block_size,
                              new_tokens):
    """Generates with a DynamicCache and with a KvstarCache holding every block (sparse_ratio 1),
    asserts identical tokens and returns (the kvstar cache, its stats)."""
    reference = model.generate(ids, past_key_values=transformers.DynamicCache(config=model.config),
                               max_new_tokens=new_tokens, do_sample=False)
    cache = kvhf.KvstarCache(model.config, client, sequence_id, block_size=block_size,
                             sparse_ratio=1.0, retrieval_stride=4,
                             max_tokens=ids.shape[1] + new_tokens + block_size)
    try:
        output = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens,
                                do_sample=False)
        stats = cache.stats()
    finally:
        cache.close()
    assert output.tolist() == reference.tolist(), (
        tokenizer.decode(reference[0, ids.shape[1]:]), tokenizer.decode(output[0, ids.shape[1]:]))
    return cache, stats


def test_full_ratio_reproduces_dynamic_cache_greedy_tokens(model_and_tokenizer, client):
    model, tokenizer = model_and_tokenizer
    ids = prompt_ids(tokenizer, 900)
    new_tokens = 24
    # Blocks of 16 tokens: the prompt spans many blocks and decode completes and appends one.
    _, stats = expect_same_greedy_tokens(model, tokenizer, client, "hf-equal", ids, 16, new_tokens)
    layers = model.config.num_hidden_layers
    assert stats["blocks_offloaded"] >= layers * (ids.shape[1] // 16 + 1)  # prompt + a decode block
    assert stats["selections_published"] > layers  # Seal's and later retrievals'
    assert stats["decode_step"] == new_tokens - 1


def test_caches_sharing_one_slot_pool_reproduce_dynamic_cache_and_hand_slots_on(
        model_and_tokenizer):
    """Two requests, one after the other, over one client's shared pool (a tensor, as an
    engine's paged KV pool would be): each reproduces DynamicCache's tokens at sparse_ratio 1,
    and closing the first returns its slots for the second."""
    model, tokenizer = model_and_tokenizer
    try:
        kvstar.node.find_server()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    ids = prompt_ids(tokenizer, 600)
    block_size, new_tokens = 16, 20
    max_tokens = ids.shape[1] + new_tokens + block_size
    max_blocks = -(-max_tokens // block_size) + 1  # as KvstarCache sizes it
    config = model.config
    heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    sizes = kvstar.slot_pool_for(config.num_hidden_layers, config.num_attention_heads, heads,
                                 head_dim, max_blocks, max_sequences=1, headroom_fraction=0.25,
                                 dtype="float32", block_size=block_size, sparse_ratio=1.0)
    memory = torch.empty(sizes["num_slots"] * sizes["slot_bytes"], dtype=torch.uint8,
                         device=DEVICE)
    backend = kvstar.BACKEND_CUDA if DEVICE == "cuda" else kvstar.BACKEND_HOST
    with kvhf.StorageNode() as node, kvstar.Client(node.address, backend=backend) as pooled:
        pooled.create_slot_pool(memory=memory, **sizes)
        for request in ("hf-pool-0", "hf-pool-1"):
            cache, stats = expect_same_greedy_tokens(model, tokenizer, pooled, request, ids,
                                                     block_size, new_tokens)
            assert stats["reserved_slots"] == sizes["num_slots"] - sizes["headroom_slots"]
            assert 0 < stats["peak_slots_held"] <= sizes["num_slots"], stats
            pool = pooled.slot_pool_stats()
            # The request's slots were the shared pool's, and closing it gave them all back.
            assert pool["peak_slots_in_use"] >= stats["peak_slots_held"], pool
            assert pool["sequences"] == 0 and pool["slots_in_use"] == 0, pool


def test_quarter_budget_attends_to_fewer_blocks_and_reports_recall(model_and_tokenizer, client):
    model, tokenizer = model_and_tokenizer
    ids = prompt_ids(tokenizer, 1400)
    cache = kvhf.KvstarCache(model.config, client, "hf-quarter", block_size=16, sparse_ratio=0.25,
                             retrieval_stride=4, max_tokens=ids.shape[1] + 32, measure=True)
    try:
        model.generate(ids, past_key_values=cache, max_new_tokens=9, do_sample=False)
    finally:
        cache.close()
    assert cache.recall, "no recall recorded"
    middle_blocks = cache.recall[0]["middle_blocks"]
    for row in cache.recall:
        # The selection holds about a quarter of the middle blocks, never all of them.
        assert 0 < row["resident"] < row["middle_blocks"], row
        assert row["captured"] <= row["oracle"] + 1e-6, row
    assert middle_blocks > 8


def test_prompt_shorter_than_a_block_is_refused_with_its_length(model_and_tokenizer, client):
    model, tokenizer = model_and_tokenizer
    ids = prompt_ids(tokenizer, 40)
    cache = kvhf.KvstarCache(model.config, client, "hf-short", block_size=ids.shape[1] + 1)
    with pytest.raises(ValueError, match=f"{ids.shape[1]} tokens"):
        model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)


GEMMA_DIR = Path(os.environ.get("KVSTAR_GEMMA3_DIR", REPO / ".cache" / "models" / "gemma3"))
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"


def test_gemma3_sliding_and_global_layers_reproduce_dynamic_cache(client):
    """Gemma 3: kvstar serves the 3 global layers; the 15 sliding-window layers (512 tokens) stay
    transformers' own. The prompt is longer than the window, so both kinds are exercised."""
    if not (GEMMA_DIR / GEMMA_GGUF).exists():
        pytest.skip(f"no model at {GEMMA_DIR / GEMMA_GGUF} (run eval/fetch_models.sh gemma3)")
    sys.path.insert(0, str(REPO / "eval"))
    from gguf_tokenizer import load_tokenizer
    kvhf.install()
    tokenizer = load_tokenizer(GEMMA_DIR, GEMMA_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        GEMMA_DIR, gguf_file=GEMMA_GGUF, dtype=torch.float32,
        attn_implementation=kvhf.ATTENTION_NAME).to(DEVICE)
    text = (REPO / "README.md").read_text()[:3500]
    ids = tokenizer(text + "\n\nIn short, kvstar is", return_tensors="pt")["input_ids"].to(DEVICE)
    assert ids.shape[1] > model.config.sliding_window
    cache, _ = expect_same_greedy_tokens(model, tokenizer, client, "hf-gemma", ids, 32, 16)
    assert len(cache.sparse_layers) == 3
