"""kvstar for transformers 5.x: a Cache whose global-attention layers decode through a kvstar
storage node, and the attention function that reads them.

    import kvstar, kvstar.hf
    kvstar.hf.install()                       # registers attention "kvstar" (+ its mask function)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvstar")
    with kvstar.hf.StorageNode() as node, kvstar.Client(node.address) as client:
        cache = kvstar.hf.KvstarCache(model.config, client, "request-1", sparse_ratio=0.25)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=32, do_sample=False)
        cache.close()                         # drops the sequence on the node

What happens, per global-attention layer ("full_attention"; sliding-window layers stay ordinary
transformers sliding layers on the GPU):
- Prefill runs full attention (sdpa) and keeps the prompt's K/V until the prefill's last layer.
- Then every full prompt block is offloaded to the node, and the sequence is sealed with the last
  `seal_queries` (default `retrieval_stride`) prompt queries of every layer; the prompt's K/V are
  freed except the partial last block (the tail).
- Each decode step attends over the slot table's resident blocks (read from the client's slot pool)
  plus the tail, records the step's query, appends every block the tail completes (offloaded and
  kept resident) and, after the last layer, calls Client.step().
Without a kvstar cache in the forward call (e.g. a DynamicCache), the "kvstar" attention function is
plain sdpa, so one model serves both.

The attention function finds the cache through the layer that `Cache.update` just ran on this
thread (transformers does not pass the cache to attention functions): update and attention of a
layer must run on the same thread, one layer after the other, as transformers' models do.

Limits: batch size 1 per cache (one kvstar sequence); greedy or sampled decoding one token per
forward (no speculative or beam search); the prompt must hold at least one full block.
"""
import math
import threading

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import DEVICE, HOST
from .node import StorageNode

__all__ = ["install", "KvstarCache", "SparseCache", "StorageNode", "ATTENTION_NAME",
           "resident_slots_per_layer"]

ATTENTION_NAME = "kvstar"
_bound = threading.local()

_TORCH_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def install():
    """Registers the "kvstar" attention function and its mask function with transformers."""
    AttentionInterface.register(ATTENTION_NAME, kvstar_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def kvstar_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    """transformers attention function: sparse decode for a SparseCache's layers, else sdpa."""
    bound = getattr(_bound, "layer", None)
    _bound.layer = None
    if bound is None or bound.model_layer != getattr(module, "layer_idx", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    return bound.owner._attention(bound, module, query, key, value, attention_mask, dropout,
                                  scaling, kwargs)


def resident_slots_per_layer(max_blocks, init_window_sz, local_window_sz, sparse_ratio):
    """The client library's default: the resident set doubled (a new selection loads while the
    current one is read) plus 2."""
    windows = init_window_sz + local_window_sz
    middle = max(max_blocks - windows, 0)
    return 2 * (windows + math.ceil(middle * sparse_ratio)) + 2


class _SparseLayer(CacheLayerMixin):
    """One global-attention layer of a SparseCache. keys/values hold the prompt until sealing;
    afterwards only the tail (tokens after the last block the attention reads from blocks)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner, model_layer, sparse_layer):
        super().__init__()
        self.owner, self.model_layer, self.sparse_layer = owner, model_layer, sparse_layer
        self.seen = 0          # tokens of this layer so far
        self.tail_start = 0    # first token position held in keys/values after sealing
        self.next_block = 0    # next block index to hand to the node (offload or append)
        self.full_keys = None  # [Hkv, T, D] every token, only when the cache measures recall
        self.full_values = None

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise ValueError(f"{type(self.owner).__name__} holds one sequence: batch size "
                             f"{key_states.shape[0]} is not supported")
        if self.owner.sealed and key_states.shape[-2] != 1:
            raise ValueError(f"{type(self.owner).__name__}: after the prompt, forward one token "
                             f"at a time (got {key_states.shape[-2]})")
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        if self.owner.measure or self.owner.keep_all_tokens:
            k, v = key_states[0], value_states[0]
            self.full_keys = k if self.full_keys is None else torch.cat([self.full_keys, k], 1)
            self.full_values = v if self.full_values is None else torch.cat([self.full_values, v], 1)
        _bound.layer = self
        return self.keys, self.values

    def get_mask_sizes(self, query_length):
        return self.seen + query_length, 0

    def get_seq_length(self):
        return self.seen

    def get_max_length(self):
        return -1

    def block_tokens(self, block):
        """K and V of a complete block still in the tail, [block_size][Hkv][D] contiguous each."""
        bs = self.owner.block_size
        start = block * bs - self.tail_start
        k = self.keys[0, :, start:start + bs].transpose(0, 1).contiguous()
        v = self.values[0, :, start:start + bs].transpose(0, 1).contiguous()
        return k, v

    def drop_tail_blocks(self, resident_blocks):
        """Frees tail tokens of complete blocks the attention now reads from `resident_blocks`."""
        bs = self.owner.block_size
        while self.seen - self.tail_start >= bs and (self.tail_start // bs) in resident_blocks:
            self.keys = self.keys[:, :, bs:]
            self.values = self.values[:, :, bs:]
            self.tail_start += bs


class SparseCache(Cache):
    """A Cache whose global-attention layers attend, after the prompt, only over a selection of
    blocks plus the tail. Subclasses say which blocks and where their K/V come from:
      _seal(layers, queries)                  after the prompt: queries [L][s][Hq][D]
      _blocks(layer, query) -> (ids, K, V)    the step's resident blocks ascending, their K/V
                                              [Hkv, n*bs, D] (ids are block indices)
      _after_attention(layer, query)          the step's query was read
      _append(layer, block, k, v)             a decode block completed ([bs][Hkv][D] each)
      _end_step()                             after the last layer of a decode step
    With measure=True the cache keeps every token's K/V besides and records, per layer and step,
    the attention mass of the windows and the share of the middle blocks' mass that the resident
    blocks capture, with the oracle's at the same count (see `recall`).
    """

    def __init__(self, config, block_size=128, init_window_sz=1, local_window_sz=2,
                 sparse_ratio=0.25, retrieval_stride=8, measure=False, seal_queries=None):
        text_config = config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or (
            ["full_attention"] * text_config.num_hidden_layers)
        self.block_size, self.init_window_sz, self.local_window_sz = (block_size, init_window_sz,
                                                                      local_window_sz)
        self.sparse_ratio, self.retrieval_stride, self.measure = (sparse_ratio, retrieval_stride,
                                                                  measure)
        # Prompt queries that vote for the first selection (default: retrieval_stride).
        self.seal_queries = seal_queries or retrieval_stride
        self.num_q_heads = text_config.num_attention_heads
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads)
        layers, self.sparse_layers = [], []
        for index, layer_type in enumerate(layer_types):
            if layer_type == "full_attention":
                layer = _SparseLayer(self, index, len(self.sparse_layers))
                self.sparse_layers.append(layer)
            elif layer_type == "sliding_attention":
                layer = DynamicSlidingWindowLayer(sliding_window=text_config.sliding_window)
            else:
                raise ValueError(f"layer {index} has type {layer_type!r}: {type(self).__name__} "
                                 "serves full_attention and sliding_attention layers only")
            layers.append(layer)
        if not self.sparse_layers:
            raise ValueError("the model has no full_attention layer for kvstar to serve")
        super().__init__(layers=layers)
        self.sealed = False
        self.decode_step = 0
        self.keep_all_tokens = False  # subclasses that select from local K/V set it
        self._prompt_queries = [None] * len(self.sparse_layers)
        self.recall = []  # dicts: layer, step, window_mass, middle_mass, capture, oracle, resident

    # The attention function's entry point.
    def _attention(self, layer, module, query, key, value, attention_mask, dropout, scaling,
                   kwargs):
        if not self.sealed:
            output = sdpa_attention_forward(module, query, key, value, attention_mask,
                                            dropout=dropout, scaling=scaling, **kwargs)
            self._prompt_queries[layer.sparse_layer] = (
                query[0, :, -self.seal_queries:].transpose(0, 1).contiguous())
            if layer is self.sparse_layers[-1]:
                self._finish_prompt()
            return output
        q = query[0, :, 0]  # [Hq, D]
        ids, block_k, block_v = self._blocks(layer, q)
        keys = torch.cat([block_k, layer.keys[0]], dim=1)
        values = torch.cat([block_v, layer.values[0]], dim=1)
        output = torch.nn.functional.scaled_dot_product_attention(
            query[0], keys, values, scale=scaling, enable_gqa=self.num_q_heads != self.num_kv_heads)
        if self.measure:
            self._measure(layer, q, ids, scaling)
        self._after_attention(layer, q)
        bs = self.block_size
        while (layer.next_block + 1) * bs <= layer.seen:
            k, v = layer.block_tokens(layer.next_block)
            self._append(layer, layer.next_block, k, v)
            layer.next_block += 1
        if layer is self.sparse_layers[-1]:
            self.decode_step += 1
            self._end_step()
        return output[None].transpose(1, 2).contiguous(), None

    def _finish_prompt(self):
        bs = self.block_size
        tokens = self.sparse_layers[0].seen
        if tokens < bs:
            raise ValueError(f"the prompt has {tokens} tokens, fewer than one block "
                             f"({bs}): {type(self).__name__} needs at least one full block")
        queries = torch.stack(self._prompt_queries)  # [L, s, Hq, D]
        self._prompt_queries = [None] * len(self.sparse_layers)
        for layer in self.sparse_layers:
            full = layer.seen // bs
            layer.next_block = full
            layer.prompt_blocks = full
        self._seal(queries)
        # Only the unfinished block stays in the tail; the copy frees the prompt's storage.
        for layer in self.sparse_layers:
            keep = layer.prompt_blocks * bs - layer.tail_start
            layer.keys = layer.keys[:, :, keep:].clone()
            layer.values = layer.values[:, :, keep:].clone()
            layer.tail_start = layer.prompt_blocks * bs
        self.sealed = True

    def _measure(self, layer, q, resident_ids, scaling):
        """Attention mass of the windows and middle-block capture of this step (see `recall`)."""
        bs = self.block_size
        scores = torch.einsum("hd,htd->ht", q.float(),
                              layer.full_keys.float().repeat_interleave(
                                  self.num_q_heads // self.num_kv_heads, 0)) * scaling
        mass = torch.softmax(scores, dim=-1).mean(0)  # [T]
        full = layer.seen // bs
        block_mass = mass[:full * bs].view(full, bs).sum(1)
        middle_lo, middle_hi = self.init_window_sz, max(full - self.local_window_sz,
                                                        self.init_window_sz)
        middle = block_mass[middle_lo:middle_hi]
        middle_mass = float(middle.sum())
        chosen = [b for b in resident_ids if middle_lo <= b < middle_hi]
        captured = float(block_mass[chosen].sum()) if chosen else 0.0
        oracle = float(torch.topk(middle, len(chosen)).values.sum()) if chosen else 0.0
        self.recall.append({"layer": layer.sparse_layer, "step": self.decode_step,
                            "window_mass": 1.0 - middle_mass, "middle_mass": middle_mass,
                            "captured": captured, "oracle": oracle, "resident": len(chosen),
                            "middle_blocks": middle_hi - middle_lo})

    # What subclasses provide.
    def _seal(self, queries):
        """After the prompt, before the tail is trimmed to the unfinished block: every layer's
        keys/values still hold its prompt_blocks complete blocks (see block_tokens)."""
        raise NotImplementedError

    def _blocks(self, layer, query):
        raise NotImplementedError

    def _after_attention(self, layer, query):
        pass

    def _append(self, layer, block, key, value):
        raise NotImplementedError

    def _end_step(self):
        pass


class KvstarCache(SparseCache):
    """SparseCache over a kvstar storage node, through the client library (kvstar.Client).

    config: the model's config. client: a connected kvstar.Client (host or CUDA backend; on CUDA
    the slot pool lives in device memory and copies run on torch's current stream). sequence_id:
    unique per request on that node. max_tokens: the longest the sequence may grow (prompt + new
    tokens; default the model's max_position_embeddings), which sizes the slot pool. Knobs as in
    kvstar.proto's KvstarConfig; the slot pool takes the dtype and device of the K/V the model
    produces. seal_queries: how many of the prompt's last queries vote
    for the first selection (default retrieval_stride; the node takes up to
    max(retrieval_stride, 128)). block_vote: 0 sums the query rows' softmax shares of a block
    (the original algorithm), 1 takes the largest."""

    def __init__(self, config, client, sequence_id, max_tokens=None, block_size=128,
                 init_window_sz=1, local_window_sz=2, sparse_ratio=0.25, retrieval_stride=8,
                 blk_repre_dim_prune_ratio=0.25, blk_repre_inner_token_merge=2, block_vote=0,
                 seal_queries=None, measure=False):
        super().__init__(config, block_size, init_window_sz, local_window_sz, sparse_ratio,
                         retrieval_stride, measure, seal_queries)
        text_config = config.get_text_config(decoder=True)
        self.client, self.sequence_id = client, sequence_id
        self.max_tokens = max_tokens or text_config.max_position_embeddings
        self.knobs = dict(init_window_sz=init_window_sz, local_window_sz=local_window_sz,
                          sparse_ratio=sparse_ratio, retrieval_stride=retrieval_stride,
                          blk_repre_dim_prune_ratio=blk_repre_dim_prune_ratio,
                          blk_repre_inner_token_merge=blk_repre_inner_token_merge,
                          block_vote=block_vote)
        self.sequence = None
        self.pool = None

    def _open(self, dtype, device):
        max_blocks = math.ceil(self.max_tokens / self.block_size) + 1
        if device.type == "cuda" and self.client.backend != "cuda":
            raise ValueError("the model runs on CUDA but the kvstar client runs on the host "
                             f"backend ({self.client.backend}): connect with BACKEND_CUDA")
        if device.type != "cuda" and self.client.backend == "cuda":
            raise ValueError("the model runs on the CPU but the kvstar client uses CUDA: connect "
                             "with backend=kvstar.BACKEND_HOST")
        self._where = DEVICE if device.type == "cuda" else HOST
        slot_shape = (2, self.block_size, self.num_kv_heads, self.head_dim)
        shared = self.client.slot_pool_memory
        if self.client.has_slot_pool:
            if not isinstance(shared, torch.Tensor):
                raise ValueError("KvstarCache reads the client's shared slot pool as a tensor: "
                                 "create it with Client.create_slot_pool(memory=<tensor>)")
            # The client's shared pool (Client.create_slot_pool over a tensor): every cache of
            # the client reads its slots from it.
            if shared.device.type != device.type:
                raise ValueError(f"the client's slot pool is on {shared.device}, the model's K/V "
                                 f"on {device}")
            self.pool = shared.view(torch.uint8).view(dtype).view(-1, *slot_shape)
            self.sequence = self.client.create_sequence(
                self.sequence_id, len(self.sparse_layers), self.num_q_heads, self.num_kv_heads,
                self.head_dim, dtype=_TORCH_DTYPES[dtype], block_size=self.block_size,
                max_blocks_per_layer=max_blocks, **self.knobs)
            return
        # A pool of the sequence's own; slot ids index it whole, whatever the layer.
        self.slots_per_layer = resident_slots_per_layer(max_blocks, self.init_window_sz,
                                                        self.local_window_sz, self.sparse_ratio)
        self.pool = torch.empty((len(self.sparse_layers) * self.slots_per_layer, *slot_shape),
                                dtype=dtype, device=device)
        self.sequence = self.client.create_sequence(
            self.sequence_id, len(self.sparse_layers), self.num_q_heads, self.num_kv_heads,
            self.head_dim, dtype=_TORCH_DTYPES[dtype], block_size=self.block_size,
            slots_per_layer=self.slots_per_layer, slot_pool=self.pool, **self.knobs)

    def _torch_stream(self):
        if self._where == DEVICE:
            return torch.cuda.current_stream()
        return None

    def _seal(self, queries):
        layer0 = self.sparse_layers[0]
        self._open(layer0.dtype, layer0.device)
        stream = self._torch_stream()
        staged = []  # device blocks are read by the library's side stream until Seal's Flush
        for layer in self.sparse_layers:
            for block in range(layer.prompt_blocks):
                k, v = layer.block_tokens(block)
                self.sequence.offload(layer.sparse_layer, block, k, v, stream=stream,
                                      where=self._where)
                staged.append((k, v))
        queries = queries.contiguous()
        self.sequence.seal(queries, queries.shape[1], stream=stream, where=self._where)
        del staged

    def _blocks(self, layer, query):
        table = self.sequence.acquire(layer.sparse_layer, stream=self._torch_stream())
        layer.drop_tail_blocks(set(table.blocks()))
        # Blocks still in the tail are read from there, not from their slots.
        first_tail_block = layer.tail_start // self.block_size
        resident = [(table.block_indices[i], table.host_slots[i]) for i in range(table.count)
                    if table.block_indices[i] < first_tail_block]
        ids = [block for block, _ in resident]
        slots = torch.tensor([slot for _, slot in resident], dtype=torch.long,
                             device=self.pool.device)
        blocks = self.pool.index_select(0, slots)  # [n, 2, bs, Hkv, D]
        n = blocks.shape[0]
        k = blocks[:, 0].reshape(n * self.block_size, self.num_kv_heads, self.head_dim)
        v = blocks[:, 1].reshape(n * self.block_size, self.num_kv_heads, self.head_dim)
        return ids, k.transpose(0, 1), v.transpose(0, 1)

    def _after_attention(self, layer, query):
        stream = self._torch_stream()
        self.sequence.record_query(layer.sparse_layer, query.contiguous(), stream=stream,
                                   where=self._where)
        self.sequence.release(layer.sparse_layer, stream=stream)

    def _append(self, layer, block, key, value):
        # From host copies: the library's side-stream read of a device tensor would outlive it.
        # One small copy per layer every block_size steps.
        self.sequence.append_block(layer.sparse_layer, key.cpu(), value.cpu(),
                                   stream=self._torch_stream(), where=HOST)

    def _end_step(self):
        self.client.step()

    def stats(self):
        """The sequence's client-side counters (see SequenceStats in client.h)."""
        return self.sequence.stats() if self.sequence is not None else {}

    def close(self):
        """Drops the sequence on the node and frees the slot pool."""
        if self.sequence is not None:
            self.client.drop_sequence(self.sequence_id)
            self.sequence = None
        self.pool = None
