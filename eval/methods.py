"""Block-selection methods the accuracy harness compares with kvstar, at kvstar's budget.

Each is a kvstar.hf.SparseCache that keeps every token's K/V locally and selects, per layer, the
blocks the decode step attends to; the attention then reads exactly what kvstar's would read: the
init and local windows, the selected middle blocks, the tail (tokens of the unfinished block), and
blocks completed since the last selection. k = ceil(middle blocks x sparse_ratio) at each
selection, as in kvstar's Retrieve.

  oracle        the current step's true attention (averaged over query heads), every step
  quest         Quest-style bounds: per block and channel the min and max key; a query's bound is
                sum_d max(q_d min_d, q_d max_d); every step with the current query
  quest_stride  the same bounds, refreshed every retrieval_stride steps from that stride's queries
  meankey       the mean key of each block (the original system's ESA representation), refreshed
                every stride from its queries
  window        no scoring: the k middle blocks next to the local window (StreamingLLM-like)
  stale_oracle  the true attention of the stride's queries (exact keys, no representation),
                refreshed every stride: the best any stride-refreshed method can do
  stale_oracle_max  the same, each block scored by its largest share in any query row and head
                (instead of the sum over them)

Scores of several query rows and heads are combined the way kvstar votes: a softmax over blocks
per row and head (logits scaled by 1/sqrt(head_dim)), summed. The stride-refreshed methods select
at the step boundary itself, a step fresher than kvstar, whose selection is computed in the
background and visible one step later.
"""
import math

import torch

from kvstar.hf import SparseCache

METHODS = ("oracle", "quest", "quest_stride", "meankey", "window", "stale_oracle",
           "stale_oracle_max")
PER_STEP = {"oracle", "quest"}


class LocalSelectionCache(SparseCache):
    def __init__(self, config, method, **knobs):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
        super().__init__(config, **knobs)
        self.method = method
        self.keep_all_tokens = True
        self.group = self.num_q_heads // self.num_kv_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        layers = len(self.sparse_layers)
        self._window = [[] for _ in range(layers)]   # this stride's queries, [Hq, D] each
        self._selected = [set() for _ in range(layers)]
        self._selected_at = [0] * layers              # full blocks when the selection was made
        self.blocks_loaded = 0                        # blocks that entered a resident set
        self.selections = 0

    def stats(self):
        return {"blocks_loaded": self.blocks_loaded, "selections_published": self.selections,
                "decode_step": self.decode_step, "max_staleness_steps":
                0 if self.method in PER_STEP else self.retrieval_stride - 1}

    def close(self):
        pass

    def _seal(self, queries):
        if self.method in PER_STEP:
            return
        for layer in self.sparse_layers:
            self._select(layer, list(queries[layer.sparse_layer]))

    def _select(self, layer, rows):
        bs = self.block_size
        full = layer.seen // bs
        lo, hi = self.init_window_sz, max(full - self.local_window_sz, self.init_window_sz)
        k = math.ceil((hi - lo) * self.sparse_ratio)
        chosen = set(range(min(self.init_window_sz, full))) | set(range(hi, full))
        if k > 0:
            if self.method == "window":
                chosen |= set(range(hi - k, hi))
            else:
                scores = self._scores(layer, rows, full)[lo:hi]
                chosen |= {lo + int(i) for i in torch.topk(scores, k).indices}
        index = layer.sparse_layer
        self.blocks_loaded += len(chosen - self._selected[index])
        self._selected[index], self._selected_at[index] = chosen, full
        self.selections += 1

    def _scores(self, layer, rows, full):
        """One score per complete block: the vote of `rows` (query vectors [Hq, D])."""
        bs = self.block_size
        keys = layer.full_keys[:, :full * bs].float().view(self.num_kv_heads, full, bs,
                                                           self.head_dim)
        q = torch.stack(rows).float()  # [s, Hq, D]
        q = q.view(q.shape[0], self.num_kv_heads, self.group, self.head_dim)
        if self.method in ("oracle", "stale_oracle", "stale_oracle_max"):
            # the true attention over every token, tail included
            every = layer.full_keys.float().view(self.num_kv_heads, 1, -1, self.head_dim)
            probs = torch.softmax(torch.einsum("sngd,nztd->sngt", q, every) * self.scale, -1)
            blocks = probs[..., :full * bs].reshape(*probs.shape[:3], full, bs).sum(4)
            if self.method == "stale_oracle_max":
                return blocks.amax((0, 1, 2))
            return blocks.sum((0, 1, 2))
        if self.method in ("quest", "quest_stride"):
            low, high = keys.amin(2), keys.amax(2)  # [n, b, d]
            bound = torch.maximum(torch.einsum("sngd,nbd->sngbd", q, low),
                                  torch.einsum("sngd,nbd->sngbd", q, high)).sum(-1)
            logits = bound * self.scale
        else:  # meankey
            logits = torch.einsum("sngd,nbd->sngb", q, keys.mean(2)) * self.scale
        return torch.softmax(logits, dim=-1).sum((0, 1, 2))

    def _blocks(self, layer, query):
        index = layer.sparse_layer
        bs = self.block_size
        full = layer.seen // bs
        if self.method in PER_STEP:
            self._select(layer, [query])
        elif self.decode_step > 0 and self.decode_step % self.retrieval_stride == 0 and \
                self._window[index]:
            self._select(layer, self._window[index])
            self._window[index] = []
        # Blocks completed since the selection stay resident, as kvstar's appended blocks do.
        resident = self._selected[index] | set(range(self._selected_at[index], full))
        layer.drop_tail_blocks(resident)
        ids = sorted(b for b in resident if b < layer.tail_start // bs)
        tokens = torch.cat([torch.arange(b * bs, (b + 1) * bs) for b in ids]) if ids else \
            torch.zeros(0, dtype=torch.long)
        tokens = tokens.to(layer.full_keys.device)
        return ids, layer.full_keys[:, tokens], layer.full_values[:, tokens]

    def _after_attention(self, layer, query):
        if self.method not in PER_STEP:
            self._window[layer.sparse_layer].append(query)

    def _append(self, layer, block, key, value):
        pass
