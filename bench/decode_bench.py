"""Decode of a whole decoder with random bf16 weights: full attention with every KV block in HBM
against kvstar (a storage node as a sidecar process, the shared-memory data plane, retrievals from
the model's own queries through RecordQuery, selections loaded by the client library's CUDA
copies). Run on the GPU machine through deploy/device/decode.sh; see docs/PERFORMANCE.md.

    python3 bench/decode_bench.py --models qwen2.5-14b --contexts 32768 --configs full,kvstar0.25

One loop serves every configuration. A step embeds the batch's tokens, runs every layer (RMSNorm,
fused QKV projection, the new token's K/V written into the sequence's tail page, paged attention
over the layer's table, output projection, SwiGLU MLP) and the LM head, captured as one CUDA graph
and replayed. The tables are the only difference:
  full      every block of the sequence plus its tail page, all in one paged pool in HBM;
  kvstar    the slot table that the client library's Acquire returns (its resident blocks, in
            slots of the client's shared slot pool, which is the first part of the same paged
            KV tensor) plus the tail page.
No RoPE: the planted structure below stays aligned without it (its cost is small either way).

Synthetic KV with structure that moves attention. Each middle block of a sequence is given one of
`topics` topics; its keys carry, on top of unit noise, the direction of the query that a topic's
token produces at that layer and head (the residual stream is kept close to the token embedding by
small output projections, so the real queries stay near those directions). Each sequence's input
token changes topic every `topic_period` steps (sequences of a batch at different steps, unless
--topic_stagger 0), so the model's own queries (recorded with RecordQuery) move the node's
selection from one topic's blocks to the next. With --topic_window W > 1 the topics are a ring and
the query of topic t selects the blocks of topics t..t+W-1 (a block of topic u carries the
directions of topics u-W+1..u): each change of topic then replaces 1/W of the selection instead
of all of it. `--topics 16 --topic_window 4 --topic_period 8` replaces a quarter of a 0.25
selection at every retrieval (stride 8), about what real models do at 16K-32K (Gemma 3 270M on
the H200 accuracy runs: 20-26% of its middle blocks per retrieval, eval/results/).

Slots come from the client's shared slot pool (SharedSlotPool: Client.create_slot_pool over the
engine's KV tensor, one client per kvstar configuration).

Reported per configuration: step latency p50/p99 (CUDA events on the decode stream), KV bytes in
HBM, the largest batch that fits and the batch run, tokens/s, host->device bytes per step, the
share of the step the GPU sat idle waiting for the host's kvstar calls, selection staleness and
the steps whose selections were more than stride + 1 steps old, the node's CPU use and
retrievals/s, and the step's floor: (weight bytes + KV bytes read) / the HBM bandwidth measured in
the same run. The last line is JSON.
"""
import argparse
import ctypes
import faulthandler
import json
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "client", "python"))

import sparse_attention  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    mlp: int
    vocab: int


SHAPES = {
    "qwen2.5-14b": Shape(48, 40, 8, 128, 5120, 13824, 152064),
    "llama3-8b": Shape(32, 32, 8, 128, 4096, 14336, 128256),
    # For a dry run on a CPU (no graphs, repack attention).
    "tiny": Shape(2, 4, 2, 64, 256, 512, 1024),
}
BLOCK_SIZE = 128
GIB = 1 << 30


def page_bytes(shape, dtype_bytes=2):
    """K + V of one block of one layer: one slot of the client library, one page here."""
    return 2 * BLOCK_SIZE * shape.kv_heads * shape.head_dim * dtype_bytes


def weight_bytes(shape, dtype_bytes=2):
    s = shape
    per_layer = (s.hidden * (s.q_heads + 2 * s.kv_heads) * s.head_dim + s.q_heads * s.head_dim *
                 s.hidden + s.hidden * 2 * s.mlp + s.mlp * s.hidden + 2 * s.hidden)
    return dtype_bytes * (s.layers * per_layer + 2 * s.vocab * s.hidden + s.hidden)


# ---------------------------------------------------------------------------------------------
# Timing: CUDA events on the decode stream, or the host clock on a CPU dry run.

class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end):
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def measure_hbm_bandwidth(device, gib=2.0, repeats=10):
    """Device copy bandwidth, bytes read + written per second (the HBM baseline of this run)."""
    if device.type != "cuda":
        return float("nan")
    n = int(gib * GIB) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / seconds


# ---------------------------------------------------------------------------------------------
# The model.

class RandomDecoder:
    """Random bf16 weights of a decoder; `residual_scale` shrinks the output and down projections
    so the residual stream stays near the token embedding (see the module docstring)."""

    def __init__(self, shape, device, dtype=torch.bfloat16, residual_scale=0.02, seed=0):
        self.shape, self.device, self.dtype = shape, device, dtype
        generator = torch.Generator(device=device).manual_seed(seed)
        s = shape

        def weight(rows, cols, scale):
            w = torch.empty((rows, cols), dtype=dtype, device=device)
            w.normal_(0.0, scale, generator=generator)
            return w

        self.layers = []
        for _ in range(s.layers):
            self.layers.append({
                "qkv": weight(s.hidden, (s.q_heads + 2 * s.kv_heads) * s.head_dim,
                              s.hidden ** -0.5),
                "o": weight(s.q_heads * s.head_dim, s.hidden,
                            residual_scale * (s.q_heads * s.head_dim) ** -0.5),
                "gate_up": weight(s.hidden, 2 * s.mlp, s.hidden ** -0.5),
                "down": weight(s.mlp, s.hidden, residual_scale * s.mlp ** -0.5),
                "norm1": torch.ones(s.hidden, dtype=dtype, device=device),
                "norm2": torch.ones(s.hidden, dtype=dtype, device=device),
            })
        self.embed = weight(s.vocab, s.hidden, 1.0)
        self.final_norm = torch.ones(s.hidden, dtype=dtype, device=device)
        self.lm_head = weight(s.hidden, s.vocab, s.hidden ** -0.5)

    @staticmethod
    def rms_norm(x, weight, eps=1e-6):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

    def topic_directions(self, topic_tokens):
        """Per layer, unit [topics][q_heads][head_dim]: the query each topic token produces when
        the residual stream equals its embedding."""
        s = self.shape
        h = self.rms_norm(self.embed[topic_tokens], self.layers[0]["norm1"])
        out = []
        for layer in self.layers:
            q = (h @ layer["qkv"][:, :s.q_heads * s.head_dim]).float()
            q = q.view(len(topic_tokens), s.q_heads, s.head_dim)
            out.append(q / q.norm(dim=-1, keepdim=True))
        return out

    def step(self, tokens, kv, attention, query_out):
        """One decode step of the batch. kv: the paged pool state (see PagedKv); attention(layer,
        q) -> [B][Hq][D]; query_out[layer] receives the layer's query. Returns logits."""
        s = self.shape
        batch = tokens.shape[0]
        x = self.embed[tokens]
        q_width, kv_width = s.q_heads * s.head_dim, s.kv_heads * s.head_dim
        for index, layer in enumerate(self.layers):
            h = self.rms_norm(x, layer["norm1"])
            qkv = h @ layer["qkv"]
            q = qkv[:, :q_width].view(batch, s.q_heads, s.head_dim)
            k = qkv[:, q_width:q_width + kv_width].view(batch, s.kv_heads, s.head_dim)
            v = qkv[:, q_width + kv_width:].view(batch, s.kv_heads, s.head_dim)
            kv.write(index, k, v)
            query_out[index].copy_(q)
            a = attention(index, query_out[index])
            x = x + a.reshape(batch, q_width) @ layer["o"]
            h = self.rms_norm(x, layer["norm2"])
            gate, up = (h @ layer["gate_up"]).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ layer["down"]
        return self.rms_norm(x, self.final_norm) @ self.lm_head


class PagedKv:
    """The step's KV state on the device: the page pool [pages][2][bs][Hkv][D], per layer the
    table [B][max_pages] (int32 page indices, the tail page last), the count of pages per
    sequence, the tail page of every (layer, sequence), and the tail position/length."""

    def __init__(self, pool, layers, batch, max_pages, tail_pages, device):
        self.pool, self.layers, self.batch = pool, layers, batch
        self.table = torch.zeros((layers, batch, max_pages), dtype=torch.int32, device=device)
        self.count = torch.zeros((layers, batch), dtype=torch.int32, device=device)
        self.tail_pages = tail_pages.to(device=device, dtype=torch.long)  # [L][B]
        self.tail_pos = torch.zeros((batch,), dtype=torch.long, device=device)
        self.tail_len = torch.ones((batch,), dtype=torch.int32, device=device)
        self.tokens = torch.zeros((batch,), dtype=torch.long, device=device)

    def write(self, layer, k, v):
        pages = self.tail_pages[layer]
        self.pool[pages, 0, self.tail_pos] = k
        self.pool[pages, 1, self.tail_pos] = v


def make_attention(kind, kv, shape, batch, splits, device, uniform_pages=None):
    scale = shape.head_dim ** -0.5
    if kind == "triton":
        run = sparse_attention.PagedDecodeAttention(batch, shape.q_heads, shape.kv_heads,
                                                    shape.head_dim, BLOCK_SIZE, splits, device)
        return lambda layer, q: run(q, kv.pool, kv.table[layer], kv.count[layer], kv.tail_len,
                                    scale)
    if kind == "repack":
        pages = uniform_pages
        return lambda layer, q: sparse_attention.repack_sdpa_attention(
            q, kv.pool, kv.table[layer, :, :pages], kv.count[layer], kv.tail_len, scale)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# Synthetic KV.

@dataclass
class Plant:
    topics: int
    topic_period: int
    strength: float
    topic_tokens: torch.Tensor
    directions: list  # per layer [topics][Hq][D]
    stagger: bool = True
    window: int = 1  # topics a query selects: t..t+window-1 (mod topics)

    def selects(self, topic, block_topic):
        """Whether the query of `topic` selects a block of `block_topic` (tensors work too)."""
        return (block_topic - topic) % self.topics < self.window

    def topic_at(self, step, shift=0):
        """The topic of decode step `step` of a sequence whose schedule is offset by `shift`
        steps: sequences of a batch change topic at different steps, as real ones do."""
        return ((step + shift) // self.topic_period) % self.topics

    def shift_of(self, sequence):
        """Sequence b's offset: a permutation of the period's steps for b < topic_period (5 is
        coprime with the default period 16), 0 for sequence 0."""
        return (sequence * 5) % self.topic_period if self.stagger else 0


def topic_inputs(plant, batch):
    """Host copies for the decode loop: the topic tokens (reading the device's copy would wait for
    the previous step) and each sequence's schedule offset, for Plant.topic_at."""
    return {"topic_tokens": plant.topic_tokens.cpu(),
            "shifts": torch.tensor([plant.shift_of(b) for b in range(batch)])}


def block_topics(sequence, blocks, topics):
    generator = torch.Generator().manual_seed(1000 + sequence)
    return torch.randint(0, topics, (blocks,), generator=generator)


def synthetic_layer_kv(shape, plant, layer, blocks, topics_of_block, windows, generator, device):
    """K, V [blocks][bs][Hkv][D] of one layer of one sequence: unit noise; the middle blocks'
    keys also carry their topic's query directions, token t of a block the direction of query
    head (t mod group) of each KV head's group."""
    s = shape
    k = torch.empty((blocks, BLOCK_SIZE, s.kv_heads, s.head_dim), dtype=torch.bfloat16,
                    device=device)
    k.normal_(generator=generator)
    v = torch.empty_like(k).normal_(generator=generator)
    group = s.q_heads // s.kv_heads
    init, local = windows
    middle = slice(init, max(blocks - local, init))
    dirs = plant.directions[layer].view(plant.topics, s.kv_heads, group, s.head_dim)
    which = torch.arange(BLOCK_SIZE, device=device) % group  # [bs]
    # A block of topic u answers the queries of topics u-window+1..u.
    mid_topics = topics_of_block[middle].to(device)
    planted = sum(dirs[(mid_topics - j) % plant.topics] for j in range(plant.window))
    planted = planted[:, :, which].permute(0, 2, 1, 3)  # [n_mid][bs][Hkv][D]
    k[middle] += (plant.strength * math.sqrt(s.head_dim) * planted).to(k.dtype)
    return k, v


# ---------------------------------------------------------------------------------------------
# Slot pools: where a kvstar sequence's slots come from (the pluggable piece).

class SharedSlotPool:
    """The client's shared slot pool (Client.create_slot_pool) over the engine's paged KV tensor:
    each sequence reserves its resident set at its longest (kvstar.reserved_slots: the init and
    local windows plus ceil(sparse_ratio * middle) blocks per layer), and `headroom_fraction` of
    the reservations, shared by all sequences, holds the new blocks of loads in flight. The
    client staggers the sequences' retrievals over the stride, so the headroom holds about one
    step's loads."""

    name = "shared"

    def __init__(self, kvstar, shape, knobs, blocks, headroom_fraction):
        s = shape
        self.kvstar, self.shape, self.knobs, self.blocks = kvstar, shape, knobs, blocks
        self.headroom_fraction = headroom_fraction
        self.reserved = kvstar.reserved_slots(s.layers, s.q_heads, s.kv_heads, s.head_dim,
                                              blocks, block_size=BLOCK_SIZE, **knobs)
        self.resident = self.reserved // s.layers  # per layer

    def sizes(self, sequences):
        s = self.shape
        return self.kvstar.slot_pool_for(s.layers, s.q_heads, s.kv_heads, s.head_dim,
                                         self.blocks, sequences, self.headroom_fraction,
                                         block_size=BLOCK_SIZE, **self.knobs)

    def pages_per_sequence(self):
        """Slots per sequence, its share of the headroom included (not rounded)."""
        return self.reserved * (1 + self.headroom_fraction)


# ---------------------------------------------------------------------------------------------
# kvstar plumbing.

class Node:
    """The storage node as a sidecar process, its CPU time and memory read from /proc."""

    def __init__(self, shared_memory_bytes, retrieval_threads, log_path, resident=False):
        from kvstar.node import StorageNode
        # The metrics endpoint gives the node's own account of its Retrieve calls.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.metrics_address = f"127.0.0.1:{probe.getsockname()[1]}"
        flags = ["--dram_budget_bytes=0", f"--shared_memory_bytes={shared_memory_bytes}",
                 "--log_level=warn", f"--metrics_listen={self.metrics_address}"]
        if retrieval_threads:
            flags.append(f"--retrieval_threads={retrieval_threads}")
        if resident:
            flags.append("--segment_resident_blocks")
        self.node = StorageNode(backend="memory", extra_flags=flags, log_path=log_path)
        self.pid = self.node._process.pid

    def cpu_seconds(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def retrieve_times(self):
        """The node's Retrieve counters: calls, and seconds by phase (Stats' retrieve_*_micros),
        keyed by the metric's name without kvstar_ and _total."""
        import urllib.request
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        times = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "kvstar_retrievals_total" or (name.startswith("kvstar_retrieve_")
                                                     and name.endswith("_seconds_total")):
                times[name[len("kvstar_"):-len("_total")]] = float(value)
        return times

    def rss_bytes(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def close(self):
        self.node.close()


def mem_available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class KvstarBatch:
    """B kvstar sequences on one client: fill, seal, and the per-step calls through the C API
    (the Python wrappers allocate per call; the hot loop does not)."""

    def __init__(self, kvstar, client, shape, knobs, pool, stream, where):
        self.kvstar, self.lib = kvstar, kvstar._load()
        self.client, self.shape, self.knobs = client, shape, knobs
        self.pool, self.where = pool, where
        self.stream = stream
        self.sequences, self.ids = [], []
        self.tables = []  # per sequence, per layer: a reusable SlotTable

    def stream_handle(self):
        return None if self.stream is None else self.stream.cuda_stream

    def add(self, sequence_id, blocks, plant, topics_of_block, seed, deadline=None):
        """Creates, fills and returns one sequence in the client's shared pool; TimeoutError
        (sequence dropped) when the fill passes `deadline` (time.perf_counter())."""
        s, L = self.shape, self.shape.layers
        sequence = self.client.create_sequence(
            sequence_id, L, s.q_heads, s.kv_heads, s.head_dim, dtype=self.kvstar.BF16,
            block_size=BLOCK_SIZE, max_blocks_per_layer=blocks + 1, **self.knobs)
        device = self.pool.device
        generator = torch.Generator(device=device).manual_seed(seed)
        windows = (self.knobs["init_window_sz"], self.knobs["local_window_sz"])
        start = time.perf_counter()
        for layer in range(L):
            k, v = synthetic_layer_kv(s, plant, layer, blocks, topics_of_block, windows,
                                      generator, device)
            # Offloaded from host copies: the library copies device blocks on a side stream that
            # the decode stream does not wait for, so a freed device tensor could be reused first.
            k, v = k.cpu(), v.cpu()
            for block in range(blocks):
                sequence.offload(layer, block, k[block], v[block], where=self.kvstar.HOST)
            del k, v
            if layer % 16 == 15 or layer == L - 1:
                elapsed = time.perf_counter() - start
                print(f"  fill {sequence_id}: {layer + 1}/{L} layers queued in {elapsed:.1f} s",
                      flush=True)
            if deadline is not None and time.perf_counter() > deadline:
                self.client.drop_sequence(sequence_id)
                raise TimeoutError(f"fill of {sequence_id} passed its deadline at layer {layer}")
        t = time.perf_counter()
        sequence.flush()
        print(f"  fill {sequence_id}: flushed in {time.perf_counter() - t:.1f} s, "
              f"{L * blocks * page_bytes(s) / (time.perf_counter() - start) / 1e9:.2f} GB/s",
              flush=True)
        self.sequences.append(sequence)
        self.ids.append(sequence_id)
        self.tables.append([self.kvstar.SlotTable() for _ in range(L)])
        return sequence

    def seal(self, sequence, plant, seal_queries, shift):
        """Seals with `seal_queries` copies of the sequence's first topic's query directions
        (scaled to the norm of a real query) in every layer: the prompt's last queries."""
        s = self.shape
        topic = plant.topic_at(0, shift)
        q = torch.stack([plant.directions[l][topic] for l in range(s.layers)])
        q = (q * math.sqrt(s.head_dim)).to(torch.bfloat16)
        q = q[:, None].expand(s.layers, seal_queries, s.q_heads, s.head_dim).contiguous()
        sequence.seal(q.cpu(), seal_queries, where=self.kvstar.HOST)
        if self.stream is not None:
            self.stream.synchronize()

    def acquire_all(self, host_table, host_count, tail_pages_np, stale_out):
        """Acquire of every layer of every sequence into the host table [L][B][max] (global page
        indices, tail page appended) and counts; stale_out[b][l] = step - selection_step."""
        stream = self.stream_handle()
        L = self.shape.layers
        batch = len(self.sequences)
        acquire, memmove, byref = self.lib.kvstar_acquire, ctypes.memmove, ctypes.byref
        base, row_bytes = host_table.ctypes.data, host_table.strides[1]
        layer_bytes = host_table.strides[0]
        width = host_table.shape[2]
        for b, sequence in enumerate(self.sequences):
            handle = sequence._handle
            tables = self.tables[b]
            for layer in range(L):
                table = tables[layer]
                code = acquire(handle, layer, stream, byref(table))
                if code:
                    self.kvstar._check(code)
                if table.count >= width:
                    raise RuntimeError(f"a table of {table.count} slots exceeds the bench's "
                                       f"{width - 1} per row")
                memmove(base + layer * layer_bytes + b * row_bytes, table.host_slots,
                        4 * table.count)
                host_count[layer, b] = table.count
                stale_out[b, layer] = table.step - table.selection_step
        # The library's slot ids index the shared pool, which is the first pages of the KV pool;
        # then each row's tail page after its slots.
        layers, seqs = np.meshgrid(np.arange(L), np.arange(batch), indexing="ij")
        host_table[layers, seqs, host_count[:, :batch]] = tail_pages_np[:, :batch]
        host_count[:, :batch] += 1

    def record_and_release(self, queries):
        """queries: [L][B][Hq][D] device tensor that outlives the library's side-stream copy."""
        stream = self.stream_handle()
        L = self.shape.layers
        base = queries.data_ptr()
        row_bytes = queries.stride(1) * queries.element_size()
        layer_bytes = queries.stride(0) * queries.element_size()
        record, release = self.lib.kvstar_record_query, self.lib.kvstar_release
        for b, sequence in enumerate(self.sequences):
            handle = sequence._handle
            for layer in range(L):
                code = record(handle, layer, base + layer * layer_bytes + b * row_bytes,
                              self.where, stream)
                if code:
                    self.kvstar._check(code)
                code = release(handle, layer, stream)
                if code:
                    self.kvstar._check(code)

    def resident_blocks(self, b, layer):
        table = self.tables[b][layer]
        return [table.block_indices[i] for i in range(table.count)]

    def bytes_loaded(self):
        return sum(seq.stats()["bytes_loaded"] for seq in self.sequences)

    def stats(self):
        return [seq.stats() for seq in self.sequences]

    def drop(self, keep):
        """Drops every sequence after the first `keep` (their slots stay allocated)."""
        for sequence_id in self.ids[keep:]:
            self.client.drop_sequence(sequence_id)
        del self.sequences[keep:], self.ids[keep:], self.tables[keep:]

    def close(self):
        for sequence_id in self.ids:
            self.client.drop_sequence(sequence_id)
        self.sequences, self.ids = [], []


# ---------------------------------------------------------------------------------------------
# One configuration's decode loop.

def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class DecodeRun:
    """Captures the step for one batch and table layout and replays it."""

    def __init__(self, model, kv, attention, use_graph, device):
        self.model, self.kv, self.device = model, kv, device
        s = model.shape
        self.queries = torch.zeros((s.layers, kv.batch, s.q_heads, s.head_dim),
                                   dtype=torch.bfloat16, device=device)
        self.query_ring = [torch.zeros_like(self.queries) for _ in range(8)]
        self.attention = attention
        self.graph = None
        if use_graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm the kernels and the allocator outside the capture
                    self.logits = self._step()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
            torch.cuda.synchronize()

    def _step(self):
        return self.model.step(self.kv.tokens, self.kv, self.attention, self.queries)

    def replay(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._step()


def run_decode(args, model, kv, attention, plant, host, device, kv_batch=None, label=""):
    """Warm-up then measured steps. host: pinned staging for tables (kvstar) and step inputs.
    Returns a dict of measurements."""
    clock = Clock(device)
    s = model.shape
    batch = kv.batch
    run = DecodeRun(model, kv, attention, device.type == "cuda" and not args.no_graphs, device)
    total = args.warmup + args.steps
    assert total < BLOCK_SIZE, "the tail page holds the decode tokens: warmup + steps < 128"
    stride = args.stride
    starts, ends = [], []
    stale_max, late_steps, host_ms = [], 0, []
    step_errors = []
    retrievals = 0
    last_selection = None
    bytes_start = cpu_start = wall_start = client_start = None
    hits = []
    stale = np.zeros((batch, s.layers), dtype=np.int64)
    buffers = host["buffers"]
    for step in range(total):
        if step == args.warmup:
            clock.sync()
            bytes_start = kv_batch.bytes_loaded() if kv_batch else 0
            cpu_start = host["node"].cpu_seconds() if kv_batch else 0.0
            client_start = kv_batch.client.stats() if kv_batch else None
            node_start = host["node"].retrieve_times() if kv_batch else None
            wall_start = time.perf_counter()
        t0 = time.perf_counter()
        buf = buffers[step % len(buffers)]
        if buf["event"] is not None:
            buf["event"].synchronize()  # the copy that last read this pinned buffer is done
        # From host copies: reading the device's topic tokens would wait for the previous step.
        buf["tokens"][:] = host["topic_tokens"][plant.topic_at(step, host["shifts"])]
        buf["tail_pos"][:] = step
        buf["tail_len"][:] = step + 1
        if kv_batch is not None:
            kv_batch.acquire_all(buf["table_np"], buf["count_np"], host["tail_pages_np"], stale)
        measured = step >= args.warmup
        if measured:
            starts.append(clock.mark())
        kv.tokens.copy_(buf["tokens"], non_blocking=True)
        kv.tail_pos.copy_(buf["tail_pos"], non_blocking=True)
        kv.tail_len.copy_(buf["tail_len"], non_blocking=True)
        if kv_batch is not None:
            kv.table.copy_(buf["table"], non_blocking=True)
            kv.count.copy_(buf["count"], non_blocking=True)
        if device.type == "cuda":
            buf["event"] = torch.cuda.Event()
            buf["event"].record()
        run.replay()
        ring = run.query_ring[step % len(run.query_ring)]
        ring.copy_(run.queries)
        if measured:
            ends.append(clock.mark())
        if kv_batch is not None:
            kv_batch.record_and_release(ring)
            try:
                kv_batch.client.step()
            except kv_batch.kvstar.KvstarError as error:
                # A load refused for want of headroom (or another retrieval error): the sequence
                # keeps its visible table; counted, and decoding goes on.
                step_errors.append(str(error))
            if measured:
                worst = int(stale.max())
                stale_max.append(worst)
                if worst > stride + 1:
                    late_steps += 1
                selection = [t.selection_step for t in (tabs[0] for tabs in kv_batch.tables)]
                if last_selection is not None:
                    retrievals += sum(1 for a, b in zip(selection, last_selection) if a != b)
                last_selection = selection
                hits.append(topic_hit(kv_batch, host, plant, step))
            elif step == args.warmup - 1:
                last_selection = [t.selection_step for t in (tabs[0] for tabs in
                                                              kv_batch.tables)]
        host_ms.append((time.perf_counter() - t0) * 1e3)
    final = clock.mark()
    clock.sync()
    wall_s = time.perf_counter() - wall_start
    periods = [clock.ms(a, b) for a, b in zip(starts, starts[1:] + [final])]
    busy = [clock.ms(a, b) for a, b in zip(starts, ends)]
    out = {
        "step_ms_p50": percentile(periods, 50), "step_ms_p99": percentile(periods, 99),
        "step_ms_mean": float(np.mean(periods)),
        "gpu_busy_ms_mean": float(np.mean(busy)),
        "gpu_wait_fraction": max(0.0, 1.0 - sum(busy) / sum(periods)),
        "host_ms_per_step": float(np.mean(host_ms[args.warmup:])),
        "tokens_per_s": batch * 1e3 / float(np.mean(periods)),
        "wall_s": wall_s,
    }
    if kv_batch is not None:
        node_cpu = host["node"].cpu_seconds() - cpu_start
        loaded = kv_batch.bytes_loaded() - bytes_start
        stats = kv_batch.stats()
        client = {k: v - client_start[k] for k, v in kv_batch.client.stats().items()}
        done = max(1, client["retrievals_completed"])
        node = {k: v - node_start[k] for k, v in host["node"].retrieve_times().items()}
        calls = max(1.0, node["retrievals"])
        out.update({
            "h2d_bytes_per_step": loaded / args.steps + host["table_bytes"],
            "staleness_max": max(stale_max) if stale_max else 0,
            "staleness_p50": percentile(stale_max, 50),
            "late_steps": late_steps,
            "kept_pace": late_steps == 0,
            "retrievals": retrievals,
            "retrievals_per_s": retrievals / wall_s,
            "retrievals_needed_per_s": batch * args.steps / stride / wall_s,
            "node_cpu_cores": node_cpu / wall_s,
            "selections_dropped": sum(st["selections_dropped"] for st in stats),
            "library_max_staleness": max(st["max_staleness_steps"] for st in stats),
            "topic_hit": float(np.mean(hits)) if hits else float("nan"),
            "step_errors": len(step_errors),
            "first_step_error": step_errors[0] if step_errors else "",
            # The library's own account of the measured steps' retrievals: how the new blocks
            # came (a segment too small for the batch's regions sends the rest as bytes), and
            # where a retrieval's time went (ms per completed retrieval).
            "client_retrievals_completed": client["retrievals_completed"],
            "blocks_received_shared": client["blocks_received_shared"],
            "blocks_received_bytes": client["blocks_received_bytes"],
            "retrieve_ms_mean": client["retrieve_micros"] / done / 1e3,
            "segment_wait_ms_mean": client["segment_wait_micros"] / done / 1e3,
            "first_reply_ms_mean": client["first_reply_micros"] / done / 1e3,
            "load_ms_mean": client["load_micros"] / done / 1e3,
            "call_end_ms_mean": client["call_end_micros"] / done / 1e3,
            # The node's account of the same calls (ms per Retrieve): in all, scoring
            # (overlapped), and its sending thread's phases.
            "node_retrieve_ms_mean": node["retrieve_seconds"] / calls * 1e3,
            **{f"node_{phase}_ms_mean": node[f"retrieve_{phase}_seconds"] / calls * 1e3
               for phase in ("score", "wait", "read", "copy", "send")},
        })
    else:
        out["h2d_bytes_per_step"] = 3 * batch * 8.0
    return out


def topic_hit(kv_batch, host, plant, step):
    """Sequence 0, first and last layer: of the resident middle blocks, the share that belong to
    the topic of the queries behind the selection, over the most that could (min(selected, the
    topic's blocks)): 1 when retrieval follows the moving queries."""
    topics_of_block, init, local, blocks = host["topics0"]
    shares = []
    for layer in (0, kv_batch.shape.layers - 1):
        table = kv_batch.tables[0][layer]
        middle = [b for b in kv_batch.resident_blocks(0, layer) if init <= b < blocks - local]
        if not middle:
            continue
        topic = plant.topic_at(max(int(table.selection_step) - 1, 0))
        in_topic = int(plant.selects(topic, topics_of_block[init:blocks - local]).sum())
        hit = sum(1 for b in middle if plant.selects(topic, int(topics_of_block[b])))
        shares.append(hit / max(1, min(len(middle), in_topic)))
    return float(np.mean(shares)) if shares else float("nan")


def host_buffers(batch, layers, max_pages, device, count=2):
    pin = device.type == "cuda"
    buffers = []
    for _ in range(count):
        table = torch.zeros((layers, batch, max_pages), dtype=torch.int32, pin_memory=pin)
        counts = torch.zeros((layers, batch), dtype=torch.int32, pin_memory=pin)
        buffers.append({
            "table": table, "table_np": table.numpy(), "count": counts, "count_np": counts.numpy(),
            "tokens": torch.zeros((batch,), dtype=torch.long, pin_memory=pin),
            "tail_pos": torch.zeros((batch,), dtype=torch.long, pin_memory=pin),
            "tail_len": torch.zeros((batch,), dtype=torch.int32, pin_memory=pin),
            "event": None})
    return buffers


def time_attention(kind_fns, q, repeats, device):
    """ms per call of each attention function (layer 0), CUDA events."""
    clock = Clock(device)
    out = {}
    for name, fn in kind_fns.items():
        for _ in range(3):
            fn(0, q)
        clock.sync()
        a = clock.mark()
        for _ in range(repeats):
            fn(0, q)
        b = clock.mark()
        clock.sync()
        out[name] = clock.ms(a, b) / repeats
    return out


# ---------------------------------------------------------------------------------------------
# Configurations.

def free_hbm(device):
    if device.type != "cuda":
        return 64 * GIB
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def full_config(args, model, plant, context, batch, device, hbm_bw):
    s = model.shape
    blocks = context // BLOCK_SIZE
    pages_per_seq = s.layers * (blocks + 1)
    pool = torch.empty((batch * pages_per_seq, 2, BLOCK_SIZE, s.kv_heads, s.head_dim),
                       dtype=torch.bfloat16, device=device)
    # Page of (layer, sequence, block j): ((layer * B + b) * (blocks + 1)) + j; j = blocks is the
    # tail page.
    base = (torch.arange(s.layers)[:, None] * batch + torch.arange(batch)[None, :]) * (blocks + 1)
    tail_pages = base + blocks
    kv = PagedKv(pool, s.layers, batch, blocks + 1, tail_pages, device)
    kv.table.copy_((base[:, :, None] + torch.arange(blocks + 1)[None, None, :]).to(torch.int32))
    kv.count.fill_(blocks + 1)
    generator = torch.Generator(device=device).manual_seed(7)
    windows = (1, 2)
    for b in range(batch):
        topics = block_topics(b, blocks, plant.topics)
        for layer in range(s.layers):
            k, v = synthetic_layer_kv(s, plant, layer, blocks, topics, windows, generator, device)
            first = int(base[layer, b])
            pool[first:first + blocks, 0] = k
            pool[first:first + blocks, 1] = v
            del k, v
    splits = sparse_attention.default_splits(batch, s.kv_heads, blocks + 1, BLOCK_SIZE,
                                             num_sms=args.num_sms)
    fns = {"triton": make_attention("triton", kv, s, batch, splits, device)}
    if device.type != "cuda":
        fns = {"repack": make_attention("repack", kv, s, batch, 0, device, blocks + 1)}
    q = torch.randn((batch, s.q_heads, s.head_dim), dtype=torch.bfloat16, device=device)
    attention_ms = time_attention(fns, q, 10, device)
    kind = min(attention_ms, key=attention_ms.get)
    host = {"buffers": host_buffers(batch, s.layers, 1, device), "table_bytes": 0,
            **topic_inputs(plant, batch)}
    result = run_decode(args, model, kv, fns[kind], plant, host, device)
    kv_bytes = batch * pages_per_seq * page_bytes(s)
    kv_read = batch * s.layers * (context + args.warmup + args.steps // 2) * page_bytes(s) / \
        BLOCK_SIZE
    result.update(attention_kernel=kind, attention_ms=attention_ms, splits=splits,
                  hbm_kv_bytes=kv_bytes, kv_read_bytes_per_step=kv_read)
    del kv, pool, fns
    return result


def kvstar_config(args, model, plant, context, ratio, batch_hbm, device, hbm_bw, kvstar,
                  node, backend):
    """Fills up to the batch the node and the fill budget allow, runs that batch, then batch 1
    on the first sequence. A client of its own: its shared slot pool is sized for this
    configuration's batch. Returns (rows, notes)."""
    s = model.shape
    blocks = context // BLOCK_SIZE
    knobs = dict(init_window_sz=1, local_window_sz=2, sparse_ratio=ratio,
                 retrieval_stride=args.stride)
    source = SharedSlotPool(kvstar, s, knobs, blocks + 1, args.headroom_fraction)
    seq_kv_bytes = s.layers * blocks * page_bytes(s)
    # The node keeps K and V (and representations, about 1/16 of that): cap by host memory.
    # What the node already holds (freed by earlier configurations' drops) it reuses.
    usable = mem_available_bytes() + node.rss_bytes() - args.host_reserve_gib * GIB
    # With --segment_resident the node holds each block twice: in its store and in the segment.
    copies = 2 if args.segment_resident else 1
    node_cap = max(0, int(usable / (copies * seq_kv_bytes * 1.1)))
    if args.segment_resident:
        node_cap = min(node_cap, int(args.shared_memory_gib * GIB * 7 / 8 / seq_kv_bytes))
    want = max(1, min(batch_hbm, node_cap, args.kvstar_max_batch))
    # Seal loads each layer's first selection through the client's pinned staging and gives it
    # back once that layer's copy completed: one layer's selection must fit the staging budget.
    first_selection = source.resident * page_bytes(s)
    if first_selection > args.client_staging_bytes:
        mib = 2 ** 20
        reason = (f"one layer's first selection ({first_selection / mib:.0f} MiB) exceeds the "
                  f"client's staging budget ({args.client_staging_bytes / mib:.0f} MiB)")
        print(f"  skipped: {reason}", flush=True)
        return [], {"skipped": reason, "max_batch_hbm": batch_hbm, "node_cap": node_cap}
    # Each sequence keeps its last reply's regions of the segment until its next Retrieve: a
    # whole selection each, at worst. Beyond the segment, new blocks come as bytes in replies.
    regions = want * source.resident * s.layers * page_bytes(s)
    if args.segment_resident:  # every block of the batch, an eighth kept free for the rest
        regions = want * seq_kv_bytes * 8 / 7
    if regions > args.shared_memory_gib * GIB:
        print(f"  note: {want} sequences may hold {regions / GIB:.1f} GiB of the segment's "
              f"regions, more than --shared_memory_gib {args.shared_memory_gib:g}: the rest "
              "travel as bytes", flush=True)
    rate = FILL_RATE.get("bytes_per_s")
    budget = min(args.fill_budget_s, args.kvstar_deadline - time.perf_counter())
    if rate and seq_kv_bytes / rate > budget:
        print(f"  skipped: one sequence's fill would take {seq_kv_bytes / rate:.0f} s at the "
              f"measured {rate / 1e9:.2f} GB/s, over the {budget:.0f} s left", flush=True)
        return [], {"skipped_fill_s": seq_kv_bytes / rate}
    # The KV pool: the shared slot pool's slots first (the library's slot ids index them), then
    # one tail page per (layer, sequence) for the decode tokens.
    sizes = source.sizes(want)
    num_slots = sizes["num_slots"]
    pool = torch.empty((num_slots + s.layers * want, 2, BLOCK_SIZE, s.kv_heads, s.head_dim),
                       dtype=torch.bfloat16, device=device)
    tail_pages = num_slots + torch.arange(s.layers)[:, None] * want + torch.arange(want)[None, :]
    client = kvstar.Client(node.node.address, backend=backend)
    client.create_slot_pool(num_slots, sizes["slot_bytes"], sizes["headroom_slots"],
                            memory=pool[:num_slots])
    print(f"  shared slot pool: {num_slots} slots ({sizes['headroom_slots']} headroom) for "
          f"{want} sequences, {num_slots * page_bytes(s) / 1e9:.2f} GB", flush=True)
    stream = torch.cuda.current_stream() if device.type == "cuda" else None
    where = kvstar.DEVICE if device.type == "cuda" else kvstar.HOST
    batch = KvstarBatch(kvstar, client, s, knobs, pool, stream, where)
    fill_start = time.perf_counter()
    budget = min(args.fill_budget_s, args.kvstar_deadline - fill_start)
    seal_s = []
    topics0 = None
    try:
        for b in range(want):
            sequence_id = f"{s.layers}x{context}-r{ratio}-{b}-{time.monotonic_ns()}"
            topics = block_topics(b, blocks, plant.topics)
            if b == 0:
                topics0 = topics
            shift = plant.shift_of(b)
            try:
                sequence = batch.add(sequence_id, blocks, plant, topics, seed=100 + b,
                                     deadline=args.kvstar_deadline if b == 0 else
                                     fill_start + budget)
            except TimeoutError as error:
                print(f"  {error}", flush=True)
                if b == 0:
                    return [], {"fill_timeout": str(error)}
                break
            t = time.perf_counter()
            batch.seal(sequence, plant, args.stride, shift)
            seal_s.append(time.perf_counter() - t)
            elapsed = time.perf_counter() - fill_start
            rate = (b + 1) * seq_kv_bytes / elapsed
            FILL_RATE["bytes_per_s"] = rate
            print(f"  sealed {b + 1} sequence(s) in {elapsed:.1f} s (seal {seal_s[-1]:.2f} s)",
                  flush=True)
            if b + 1 < want and elapsed + seq_kv_bytes / rate > budget:
                break
        fill_s = time.perf_counter() - fill_start
        run_batch = len(batch.sequences)
        notes = {"batch_wanted": want, "node_cap": node_cap, "fill_s": fill_s,
                 "fill_gbps": run_batch * seq_kv_bytes / fill_s / 1e9,
                 "seal_s_mean": float(np.mean(seal_s)), "node_rss_gb": node.rss_bytes() / 1e9,
                 "resident_blocks": source.resident, "slot_pool": source.name,
                 "pool_slots": num_slots, "pool_headroom_slots": sizes["headroom_slots"],
                 "headroom_fraction": args.headroom_fraction}
        rows = []
        batches = [run_batch] + ([1] if run_batch > 1 and args.kvstar_batch1 else [])
        width = source.resident + 2  # a row: the resident slots, the tail page, one spare
        for run_b in batches:
            if run_b < len(batch.sequences):
                batch.drop(run_b)
            tails = tail_pages[:, :run_b]
            kv = PagedKv(pool, s.layers, run_b, width, tails, device)
            host = {"buffers": host_buffers(run_b, s.layers, width, device),
                    "tail_pages_np": tails.numpy().astype(np.int32), "node": node,
                    "topics0": (topics0, 1, 2, blocks),
                    "table_bytes": s.layers * run_b * (width + 1) * 4,
                    **topic_inputs(plant, run_b)}
            # Fill the device tables once for the kernel choice.
            stale = np.zeros((run_b, s.layers), dtype=np.int64)
            buf = host["buffers"][0]
            batch.acquire_all(buf["table_np"], buf["count_np"], host["tail_pages_np"], stale)
            for b in range(run_b):
                for layer in range(s.layers):
                    batch.lib.kvstar_release(batch.sequences[b]._handle, layer,
                                             batch.stream_handle())
            kv.table.copy_(buf["table"])
            kv.count.copy_(buf["count"])
            kv.tail_len.fill_(1)
            counts = set(int(c) for c in buf["count_np"].reshape(-1))
            uniform = next(iter(counts)) if len(counts) == 1 else None
            splits = sparse_attention.default_splits(run_b, s.kv_heads, source.resident + 1,
                                                     BLOCK_SIZE, num_sms=args.num_sms)
            fns = {}
            if device.type == "cuda":
                fns["triton"] = make_attention("triton", kv, s, run_b, splits, device)
            if uniform is not None:
                fns["repack"] = make_attention("repack", kv, s, run_b, splits, device, uniform)
            q = torch.randn((run_b, s.q_heads, s.head_dim), dtype=torch.bfloat16, device=device)
            attention_ms = time_attention(fns, q, 10, device)
            kind = min(attention_ms, key=attention_ms.get)
            result = run_decode(args, model, kv, fns[kind], plant, host, device, kv_batch=batch)
            pool_stats = client.slot_pool_stats()
            # HBM of the run's sequences: their share of the slot pool (reservations and headroom)
            # and their tail pages.
            per_seq_pages = num_slots / want + s.layers
            kv_read = run_b * s.layers * (source.resident * BLOCK_SIZE + args.warmup +
                                          args.steps // 2) * page_bytes(s) / BLOCK_SIZE
            result.update(batch=run_b, attention_kernel=kind, attention_ms=attention_ms,
                          splits=splits, hbm_kv_bytes=run_b * per_seq_pages * page_bytes(s),
                          kv_read_bytes_per_step=kv_read,
                          pool_peak_slots_in_use=pool_stats["peak_slots_in_use"],
                          pool_peak_headroom_in_use=pool_stats["peak_headroom_in_use"],
                          pool_takes_refused=pool_stats["takes_refused"], **notes)
            rows.append(result)
            # Printed at once: a later stall of this configuration must not lose the row.
            print("MEASURED " + json.dumps(result), flush=True)
            del kv, fns
        return rows, notes
    finally:
        batch.close()
        client.close()
        del pool


FILL_RATE = {}  # the node's fill rate measured so far in this process


def floor_ms(weights, kv_read, hbm_bw):
    return (weights + kv_read) / hbm_bw * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen2.5-14b,llama3-8b")
    parser.add_argument("--contexts", default="32768,65536,131072")
    parser.add_argument("--configs", default="full,kvstar0.25,kvstar0.1")
    parser.add_argument("--full_max_batch_contexts", default="32768,65536,131072",
                        help="contexts at which full attention also runs its largest batch")
    parser.add_argument("--kvstar_max_batch_contexts", default="32768",
                        help="contexts at which kvstar fills more than one sequence (the node's "
                             "fill time bounds the rest to batch 1)")
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--topics", type=int, default=8)
    parser.add_argument("--topic_period", type=int, default=16)
    parser.add_argument("--topic_window", type=int, default=1,
                        help="topics each query selects (a ring: t..t+W-1); a change of topic "
                             "replaces 1/W of the selection (1: all of it)")
    parser.add_argument("--plant_strength", type=float, default=0.5,
                        help="planted key component, in units of sqrt(head_dim)")
    parser.add_argument("--hbm_reserve_gib", type=float, default=6.0,
                        help="HBM kept free for activations, graphs and split buffers")
    parser.add_argument("--host_reserve_gib", type=float, default=20.0,
                        help="host memory kept for this process when sizing the node's batch")
    parser.add_argument("--kvstar_max_batch", type=int, default=64)
    parser.add_argument("--fill_budget_s", type=float, default=60.0,
                        help="stop filling more kvstar sequences once this would be exceeded")
    parser.add_argument("--kvstar_batch1", type=int, default=1,
                        help="after the largest kvstar batch, also run batch 1")
    parser.add_argument("--shared_memory_gib", type=float, default=4.0)
    parser.add_argument("--segment_resident", action="store_true",
                        help="the node keeps the blocks in the tenant's segment as they are put "
                             "(--segment_resident_blocks), so retrievals name them without a "
                             "copy; size --shared_memory_gib for the batch's KV")
    parser.add_argument("--headroom_fraction", type=float, default=0.13,
                        help="the shared slot pool's headroom, as a fraction of the sequences' "
                             "reservations (0.13 keeps a 32K sequence at 0.25, its tail page "
                             "included, under 0.3 of its full KV)")
    parser.add_argument("--topic_stagger", type=int, default=1,
                        help="sequences of a batch change topic at different steps (0: all at "
                             "once)")
    parser.add_argument("--retrieval_threads", type=int, default=0)
    parser.add_argument("--num_sms", type=int, default=0, help="0: the device's")
    parser.add_argument("--no_graphs", action="store_true")
    parser.add_argument("--kvstar_time_s", type=float, default=1e9,
                        help="kvstar configurations whose fill would end later than this many "
                             "seconds after start are skipped")
    parser.add_argument("--node_log", default="")
    parser.add_argument("--client_staging_bytes", type=int, default=256 << 20,
                        help="the client's staging budget (ClientOptions::staging_budget_bytes, "
                             "the C API's default): one layer's first selection must fit it")
    parser.add_argument("--summarize", default="",
                        help="only print the tables and the JSON of the rows in this file")
    parser.add_argument("--results", default="", help="also write every row as JSON lines here")
    args = parser.parse_args()
    args.kvstar_deadline = time.perf_counter() + args.kvstar_time_s
    if args.summarize:
        with open(args.summarize) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        print_tables([r for r in rows if not r.get("skipped")])
        for r in rows:
            if r.get("skipped"):
                print(f"skipped: {r['model']} {r['context'] // 1024}K {r['config']} (max batch "
                      f"by HBM {r['max_batch']}): {r['skipped']}")
        print(json.dumps(summary(rows)))
        return
    faulthandler.dump_traceback_later(45, repeat=True)  # where a stalled run waits

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        args.num_sms = args.num_sms or properties.multi_processor_count
        gpu = f"{properties.name}, {properties.total_memory / GIB:.1f} GiB"
    else:
        args.num_sms = args.num_sms or 8
        gpu = "none (CPU dry run)"
    import kvstar
    print(f"device: {gpu}; torch {torch.__version__}; host {os.cpu_count()} cores, "
          f"{mem_available_bytes() / GIB:.1f} GiB available", flush=True)
    hbm_bw = measure_hbm_bandwidth(device)
    print(f"HBM copy bandwidth (read + write): {hbm_bw / 1e12:.2f} TB/s", flush=True)

    rows, skipped_rows = [], []
    results_file = open(args.results, "a") if args.results else None
    started = time.perf_counter()

    def emit(row):
        row["elapsed_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
        if results_file:
            results_file.write(json.dumps(row) + "\n")
            results_file.flush()

    configs = args.configs.split(",")
    full_max_contexts = {int(c) for c in args.full_max_batch_contexts.split(",") if c}
    kvstar_max_contexts = {int(c) for c in args.kvstar_max_batch_contexts.split(",") if c}
    # One non-default stream for the whole decode: the legacy default stream would serialize
    # with the library's copy streams.
    decode_stream = torch.cuda.Stream() if device.type == "cuda" else None
    if decode_stream is not None:
        torch.cuda.set_stream(decode_stream)
    node = None
    backend = kvstar.BACKEND_CUDA if device.type == "cuda" else kvstar.BACKEND_HOST
    if any(c.startswith("kvstar") for c in configs):
        log = args.node_log or os.path.join(tempfile.gettempdir(), "kvstar-decode-node.log")
        node = Node(int(args.shared_memory_gib * GIB), args.retrieval_threads, log,
                    args.segment_resident)
    try:
        for model_name in args.models.split(","):
            shape = SHAPES[model_name]
            model = RandomDecoder(shape, device)
            topic_tokens = torch.arange(args.topics, device=device) * 37 + 11
            if not 1 <= args.topic_window <= args.topics:
                raise SystemExit(f"--topic_window is {args.topic_window}, must be in "
                                 f"[1, --topics={args.topics}]")
            plant = Plant(args.topics, args.topic_period, args.plant_strength, topic_tokens,
                          model.topic_directions(topic_tokens), bool(args.topic_stagger),
                          args.topic_window)
            weights = weight_bytes(shape)
            free = free_hbm(device) - int(args.hbm_reserve_gib * GIB)
            print(f"\n== {model_name}: weights {weights / 1e9:.1f} GB, HBM free for KV "
                  f"{free / 1e9:.1f} GB", flush=True)
            for context in [int(c) for c in args.contexts.split(",")]:
                blocks = context // BLOCK_SIZE
                full_seq = shape.layers * (blocks + 1) * page_bytes(shape)
                max_full = max(1, free // full_seq)
                common = dict(model=model_name, context=context, weights_bytes=weights,
                              hbm_bw=hbm_bw, hbm_free_for_kv=free)
                if "full" in configs:
                    for batch in sorted({1, max_full if context in full_max_contexts else 1}):
                        r = full_config(args, model, plant, context, batch, device, hbm_bw)
                        r.update(common, config="full", batch=batch, max_batch=max_full)
                        r["floor_ms"] = floor_ms(weights, r["kv_read_bytes_per_step"], hbm_bw)
                        r["floor_fraction"] = r["floor_ms"] / r["step_ms_mean"]
                        emit(r)
                        torch.cuda.empty_cache() if device.type == "cuda" else None
                for config in configs:
                    if not config.startswith("kvstar"):
                        continue
                    ratio = float(config[len("kvstar"):])
                    knobs = dict(init_window_sz=1, local_window_sz=2, sparse_ratio=ratio,
                                 retrieval_stride=args.stride)
                    source = SharedSlotPool(kvstar, shape, knobs, blocks + 1,
                                            args.headroom_fraction)
                    seq_bytes = (source.pages_per_sequence() + shape.layers) * \
                        page_bytes(shape)
                    max_kvstar = max(1, int(free // seq_bytes))
                    saved = args.kvstar_max_batch
                    if context not in kvstar_max_contexts:
                        args.kvstar_max_batch = 1
                    try:
                        results, notes = kvstar_config(args, model, plant, context, ratio,
                                                       max_kvstar, device, hbm_bw, kvstar, node,
                                                       backend)
                    finally:
                        args.kvstar_max_batch = saved
                    if not results:
                        skipped = dict(common, config=config, skipped=True, max_batch=max_kvstar,
                                       max_batch_full=max_full,
                                       hbm_kv_fraction=seq_bytes / full_seq)
                        skipped.update(notes)
                        print(f"SKIPPED {json.dumps(skipped)}", flush=True)
                        skipped_rows.append(skipped)
                        if results_file:
                            results_file.write(json.dumps(skipped) + "\n")
                            results_file.flush()
                    for r in results:
                        r.update(common, config=config, max_batch=max_kvstar,
                                 max_batch_full=max_full,
                                 hbm_kv_fraction=seq_bytes / full_seq)
                        r["floor_ms"] = floor_ms(weights, r["kv_read_bytes_per_step"], hbm_bw)
                        r["floor_fraction"] = r["floor_ms"] / r["step_ms_mean"]
                        emit(r)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if node is not None:
            node.close()
    print_tables(rows)
    print(json.dumps(summary(rows + skipped_rows)))


def print_tables(rows):
    print("\nmodel        ctx    config      batch max_b  step p50/p99 ms  tok/s    KV HBM GB "
          "H2D MB/step wait  stale max late  retr/s need/s node cores floor ms frac kernel")
    for r in rows:
        print(f"{r['model']:<12} {r['context'] // 1024:>4}K {r['config']:<11} {r['batch']:>5} "
              f"{r['max_batch']:>5} {r['step_ms_p50']:>7.2f}/{r['step_ms_p99']:<7.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['hbm_kv_bytes'] / 1e9:>9.2f} "
              f"{r['h2d_bytes_per_step'] / 1e6:>10.2f} {r['gpu_wait_fraction']:>5.3f} "
              f"{r.get('staleness_max', 0):>5} {r.get('late_steps', 0):>4} "
              f"{r.get('retrievals_per_s', 0):>6.1f} {r.get('retrievals_needed_per_s', 0):>6.1f} "
              f"{r.get('node_cpu_cores', 0):>5.1f} {r['floor_ms']:>8.2f} "
              f"{r['floor_fraction']:>4.2f} {r['attention_kernel']}")
    kvstar_rows = [r for r in rows if "node_retrieve_ms_mean" in r]
    if kvstar_rows:
        print("\nwhere a retrieval's time went, ms per call: the library (in all = segment wait + "
              "first reply + loads + later replies, of which the call's end after the last "
              "reply) and the node (in all; scoring, overlapped; its sending thread waiting for "
              "scores, reading, copying into the segment, handing replies to gRPC)")
    for r in kvstar_rows:
        later = (r["retrieve_ms_mean"] - r["segment_wait_ms_mean"] - r["first_reply_ms_mean"]
                 - r["load_ms_mean"])
        print(f"{r['model']:<12} {r['context'] // 1024:>4}K {r['config']:<11} {r['batch']:>5}  "
              f"library {r['retrieve_ms_mean']:.1f} = {r['segment_wait_ms_mean']:.1f} + "
              f"{r['first_reply_ms_mean']:.1f} + {r['load_ms_mean']:.1f} + {later:.1f} "
              f"(end {r['call_end_ms_mean']:.1f});  "
              f"node {r['node_retrieve_ms_mean']:.1f}; {r['node_score_ms_mean']:.1f}; "
              f"{r['node_wait_ms_mean']:.1f} {r['node_read_ms_mean']:.1f} "
              f"{r['node_copy_ms_mean']:.1f} {r['node_send_ms_mean']:.1f}")


def summary(rows):
    """The headline: Qwen2.5-14B (else the first model), 32K at sparse_ratio 0.25 for batches
    and throughput, the longest context at batch 1 for latency."""
    def pick(config, context=None, batch=None, largest=False):
        cands = [r for r in rows if r["config"] == config and
                 (context is None or r["context"] == context) and
                 (batch is None or r["batch"] == batch)]
        if not cands:
            return None
        return max(cands, key=lambda r: r["batch"]) if largest else cands[0]

    out = {}
    if not rows:
        return out
    model = "qwen2.5-14b" if any(r["model"] == "qwen2.5-14b" for r in rows) else rows[0]["model"]
    skipped = [r for r in rows if r["model"] == model and r.get("skipped")]
    rows = [r for r in rows if r["model"] == model and not r.get("skipped")]
    if not rows:
        return out
    short = min(r["context"] for r in rows)
    longest = max(r["context"] for r in rows)
    full_max = pick("full", short, largest=True)
    kv_max = pick("kvstar0.25", short, largest=True)
    kv01 = pick("kvstar0.1", short, largest=True)
    full_1 = pick("full", longest, 1)
    kv_1 = pick("kvstar0.25", longest, 1)
    out.update(model=model, context_batch=short, context_latency=longest)
    if full_1:
        out["step_ms_full"] = round(full_1["step_ms_p50"], 3)
    if kv_1:
        out["step_ms_kvstar"] = round(kv_1["step_ms_p50"], 3)
        if full_1:
            out["step_ratio_kvstar_over_full"] = round(kv_1["step_ms_p50"] /
                                                       full_1["step_ms_p50"], 3)
    if full_max:
        out["max_batch_full"] = full_max["max_batch"]
        out["tokens_per_s_full"] = round(full_max["tokens_per_s"], 1)
    if kv_max:
        out["max_batch_kvstar"] = kv_max["max_batch"]
        out["batch_run_kvstar"] = kv_max["batch"]
        out["tokens_per_s_kvstar"] = round(kv_max["tokens_per_s"], 1)
        out["gpu_wait_fraction"] = round(kv_max["gpu_wait_fraction"], 4)
        out["hbm_kv_fraction"] = round(kv_max["hbm_kv_fraction"], 4)
        out["retrievals_per_s"] = round(kv_max["retrievals_per_s"], 1)
        out["staleness_max"] = kv_max["staleness_max"]
        out["late_steps"] = kv_max["late_steps"]
        if full_max:
            out["max_batch_ratio"] = round(kv_max["max_batch"] / full_max["max_batch"], 3)
            out["tokens_per_s_ratio"] = round(kv_max["tokens_per_s"] /
                                              full_max["tokens_per_s"], 3)
    for config, key in (("kvstar0.25", ""), ("kvstar0.1", "_0.1")):
        # Configurations that could not run still have their HBM capacity.
        mine = [r for r in skipped if r["config"] == config and r["context"] == short]
        if mine and not pick(config, short):
            out["max_batch_kvstar" + key] = mine[0]["max_batch"]
            out["hbm_kv_fraction" + key] = round(mine[0]["hbm_kv_fraction"], 4)
            out["batch_run_kvstar" + key] = 0
            out["not_run" + key] = mine[0]["skipped"]
            if full_max:
                out["max_batch_ratio" + key] = round(mine[0]["max_batch"] /
                                                     full_max["max_batch"], 3)
    if kv01 and full_max:
        out["max_batch_kvstar_0.1"] = kv01["max_batch"]
        out["max_batch_ratio_0.1"] = round(kv01["max_batch"] / full_max["max_batch"], 3)
    out["hbm_bw_tbps"] = round(rows[0]["hbm_bw"] / 1e12, 3) if rows[0]["hbm_bw"] == \
        rows[0]["hbm_bw"] else None
    return out


if __name__ == "__main__":
    main()
