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
