#!/usr/bin/env python3
"""Dumps real post-RoPE query/key traces of SmolLM2-135M-Instruct into tests/data/.

One fixed 8192-token sequence (State of the Union addresses, file names sorted, from the first
one on, joined by blank lines, tokenized without special tokens, cut at 8192 tokens) goes through
one full-attention prefill on the CPU. A registered attention function records what attention
really sees (queries and keys after RoPE, keys before the GQA repeat) and then runs transformers'
SDPA attention, so the model's outputs are unchanged.

Written for each of LAYERS, little-endian fp16, row-major:
  layerNN.keys.f16     [tokens][num_kv_heads][head_dim]  every key of the sequence
  layerNN.queries.f16  [num_queries][num_q_heads][head_dim]  the last num_queries positions
and header.txt: one `key: value` line each (shapes, dtype, layers, model, text files, token count,
and per layer the true attention mass per 128-token block of the newest query, softmax over all
keys in fp32 from the model's own fp32 q/k, averaged over q heads).

It also prints, for all 30 layers, how the newest query's attention splits into the init window
(block 0), the local window (last 2 blocks) and the middle, with the oracle's and window-only's
share of the middle mass at kvstar's 25% budget: that survey is how LAYERS were chosen.

Usage (from the repository root, model unzipped into .cache/models/smollm2/):
  python3 eval/dump_traces.py [--model_dir .cache/models/smollm2] [--out tests/data/smollm2_sotu_8k]
"""

import argparse
import hashlib
import math
import os
import sys

import torch
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_DIR = "/work/shared/data/sotu"  # overridable with --text_dir
FIRST_FILE = "1790_george_washington_n.txt"
NUM_TOKENS = 8192
NUM_QUERIES = 16  # last prompt positions whose queries are kept (kvstar votes with the last 8)
BLOCK_SIZE = 128  # only for the per-block masses in the header and the survey
# Chosen from the survey this script prints (see tests/data/README.md): in each third of the 30
# layers (0-9, 10-19, 20-29), the layer with the largest `gain`, the share of the newest query's
# attention that the oracle's middle blocks hold and window-only's miss, middle x (oracle -
# window_only): where the selection matters most.
LAYERS = (4, 10, 23)
ATTENTION_NAME = "kvstar_trace"

_captured = {}  # layer -> (keys [kv_heads][tokens][dim], queries [q_heads][NUM_QUERIES][dim])


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    # query [batch][q_heads][seq][dim], key [batch][kv_heads][seq][dim], both post-RoPE.
    _captured[module.layer_idx] = (
        key[0].detach().float().clone(),
        query[0, :, -NUM_QUERIES:, :].detach().float().clone(),
    )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_tokens(tokenizer, text_dir):
    names = sorted(n for n in os.listdir(text_dir) if n.endswith(".txt"))
    names = names[names.index(FIRST_FILE):]
    used, text, ids = [], "", []
    for name in names:
        with open(os.path.join(text_dir, name), encoding="utf-8") as f:
            text += ("\n\n" if text else "") + f.read().strip()
        used.append(name)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= NUM_TOKENS:
            break
    if len(ids) < NUM_TOKENS:
        sys.exit(f"only {len(ids)} tokens from {text_dir}")
    return ids[:NUM_TOKENS], used


def newest_query_block_mass(keys, queries, scaling):
    # keys [kv_heads][tokens][dim], queries [q_heads][n][dim]: the last query's softmax over all
    # keys per q head (its KV head is q_head // group), averaged over q heads, summed per block.
    group = queries.shape[0] // keys.shape[0]
    q = queries[:, -1, :]
    k = keys.repeat_interleave(group, dim=0)
    probs = torch.softmax((k @ q.unsqueeze(-1)).squeeze(-1) * scaling, dim=-1).mean(dim=0)
    return probs.view(-1, BLOCK_SIZE).sum(dim=-1)


def survey(block_mass, init=1, local=2, ratio=0.25):
    middle = block_mass[init:-local]
    k = math.ceil(middle.numel() * ratio)
    total_middle = middle.sum().item()
    oracle = middle.topk(k).values.sum().item() / total_middle
    window_only = middle[-k:].sum().item() / total_middle
    return block_mass[:init].sum().item(), block_mass[-local:].sum().item(), total_middle, oracle, \
        window_only


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", default=".cache/models/smollm2")
    parser.add_argument("--text_dir", default=TEXT_DIR)
    parser.add_argument("--out", default="tests/data/smollm2_sotu_8k")
    args = parser.parse_args()

    torch.manual_seed(0)
    AttentionInterface.register(ATTENTION_NAME, _recording_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=MODEL_FILE,
                                                 dtype=torch.float32,
                                                 attn_implementation=ATTENTION_NAME)
    model.eval()
    config = model.config
    num_q_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q_heads
    scaling = head_dim ** -0.5

    ids, used = build_tokens(tokenizer, args.text_dir)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    print(f"prefill of {len(ids)} tokens: mean next-token loss {out.loss.item():.3f} nats")
    assert len(_captured) == config.num_hidden_layers, sorted(_captured)

    print("layer  init  local  middle  oracle/middle  window_only/middle   gain")
    masses = {}
    for layer in range(config.num_hidden_layers):
        keys, queries = _captured[layer]
        masses[layer] = newest_query_block_mass(keys, queries, scaling)
        init, local, middle, oracle, window_only = survey(masses[layer])
        mark = " *" if layer in LAYERS else ""
        gain = middle * (oracle - window_only)
        print(f"{layer:5d} {init:5.3f} {local:6.3f} {middle:7.3f} {oracle:14.3f} "
              f"{window_only:19.3f} {gain:6.3f}{mark}")

    os.makedirs(args.out, exist_ok=True)
    files = []
    for layer in LAYERS:
        keys, queries = _captured[layer]
        for name, tensor in (("keys", keys.permute(1, 0, 2)), ("queries", queries.permute(1, 0, 2))):
            assert tensor.abs().max().item() < 60000.0, f"layer {layer} {name} overflow fp16"
            path = os.path.join(args.out, f"layer{layer:02d}.{name}.f16")
            tensor.contiguous().to(torch.float16).numpy().astype("<f2").tofile(path)
            files.append(path)

    header = [
        ("format", "kvstar-trace-1"),
        ("model", MODEL_FILE),
        ("model_sha256", sha256(os.path.join(args.model_dir, MODEL_FILE))),
        ("transformers", transformers.__version__),
        ("torch", torch.__version__),
        ("text_files", " ".join(used)),
        ("text_join", "file names sorted from the first, stripped, joined by a blank line, "
                      "tokenized without special tokens, cut at num_tokens"),
        ("num_tokens", str(len(ids))),
        ("first_token_ids", " ".join(str(i) for i in ids[:8])),
        ("num_layers_model", str(config.num_hidden_layers)),
        ("layers", " ".join(str(layer) for layer in LAYERS)),
        ("num_q_heads", str(num_q_heads)),
        ("num_kv_heads", str(num_kv_heads)),
        ("head_dim", str(head_dim)),
        ("scaling", repr(scaling)),
        ("num_queries", str(NUM_QUERIES)),
        ("query_positions", f"{len(ids) - NUM_QUERIES}..{len(ids) - 1}"),
        ("dtype", "fp16"),
        ("keys_layout", "[num_tokens][num_kv_heads][head_dim] little-endian, file layerNN.keys.f16"),
        ("queries_layout",
         "[num_queries][num_q_heads][head_dim] little-endian, file layerNN.queries.f16"),
        ("mass_block_size", str(BLOCK_SIZE)),
    ]
    for layer in LAYERS:
        header.append((f"newest_query_block_mass_layer{layer:02d}",
                       " ".join(f"{m:.6e}" for m in masses[layer].tolist())))
    for path in files:
        header.append((f"sha256_{os.path.basename(path)}", sha256(path)))
    with open(os.path.join(args.out, "header.txt"), "w") as f:
        for key, value in header:
            f.write(f"{key}: {value}\n")
    print(f"wrote {len(files)} files and header.txt to {args.out}")


if __name__ == "__main__":
    main()
