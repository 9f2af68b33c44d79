"""The Python package on a GPU with torch: a real kvstar_server (memory backend), CUDA tensors
offloaded by data pointer, the slot pool handed in as a torch tensor, queries recorded from device
memory, and after every step each resident block's slot compared on the GPU with the tensor it
came from. Attention moves to a new block every two strides; the block must be resident within
retrieval_stride + 1 steps of the queries that point at it. Run by deploy/device/run-gpu.sh.
Exits non-zero on any mismatch."""
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "client", "python"))
import kvstar  # noqa: E402

LAYERS, Q_HEADS, KV_HEADS, DIM, BLOCK, BLOCKS, STRIDE = 4, 8, 2, 64, 128, 32, 8
SLOTS = 32


def start_server(tmp):
    port_file = os.path.join(tmp, "port")
    server = subprocess.Popen(["out/device/bin/kvstar_server", "--listen=127.0.0.1:0",
                               f"--port_file={port_file}", "--backend=memory",
                               "--log_level=warn"])
    for _ in range(400):
        if os.path.exists(port_file) and open(port_file).read().strip():
            return server, "127.0.0.1:" + open(port_file).read().strip()
        time.sleep(0.05)
    server.kill()
    raise RuntimeError("kvstar_server did not start")


def main():
    torch.manual_seed(0)
    dev = "cuda"
    # Each block's keys share a per-head topic (plus noise); queries about block b follow its topic.
    topics = torch.randn(LAYERS, BLOCKS, KV_HEADS, DIM, device=dev) * 1.5
    keys = (topics[:, :, None] + torch.randn(LAYERS, BLOCKS, BLOCK, KV_HEADS, DIM, device=dev))
    keys = keys.to(torch.bfloat16).contiguous()
    values = torch.randn(LAYERS, BLOCKS, BLOCK, KV_HEADS, DIM, device=dev).to(torch.bfloat16)
    group = Q_HEADS // KV_HEADS

    def queries_about(target):  # [LAYERS][STRIDE][Q_HEADS][DIM]
        q = topics[:, target].repeat_interleave(group, dim=1)[:, None].expand(-1, STRIDE, -1, -1)
        return (q + 0.3 * torch.randn_like(q)).to(torch.bfloat16).contiguous()

    slot_bytes = 2 * BLOCK * KV_HEADS * DIM * 2
    pool = torch.zeros(LAYERS * SLOTS * slot_bytes, dtype=torch.uint8, device=dev)
    key_bytes = keys.view(LAYERS, BLOCKS, -1).view(torch.uint8)
    value_bytes = values.view(LAYERS, BLOCKS, -1).view(torch.uint8)
    tmp = tempfile.mkdtemp()
    server, address = start_server(tmp)
    failures = 0
    try:
        with kvstar.Client(address) as client:
            print(f"backend {client.backend}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
            assert client.backend == "cuda", client.backend
            seq = client.create_sequence("torch", LAYERS, Q_HEADS, KV_HEADS, DIM, dtype=torch.bfloat16,
                                         slots_per_layer=SLOTS, slot_pool=pool,
                                         retrieval_stride=STRIDE)
            for layer in range(LAYERS):
                for index in range(BLOCKS):
                    seq.offload(layer, index, keys[layer, index], values[layer, index])
            seq.flush()
            seq.seal(queries_about(5), STRIDE)
            stream = torch.cuda.Stream()
            slots = pool.view(LAYERS * SLOTS, slot_bytes)  # slot ids index the whole pool
            target, late = 5, 0
            for step in range(1, 12 * STRIDE + 1):
                if step % (2 * STRIDE) == 1:
                    target, since = 3 + (step * 7) % (BLOCKS - 6), step
                q = queries_about(target)
                with torch.cuda.stream(stream):
                    for layer in range(LAYERS):
                        table = seq.acquire(layer, stream)
                        for i, block in enumerate(table.blocks()):
                            slot = table.slots()[i]
                            k_ok = torch.equal(slots[slot, :slot_bytes // 2], key_bytes[layer, block])
                            v_ok = torch.equal(slots[slot, slot_bytes // 2:], value_bytes[layer, block])
                            if not (k_ok and v_ok):
                                failures += 1
                                print(f"step {step} layer {layer}: slot {slot} does not hold block {block}")
                        if step - since > STRIDE + 1 and target not in table.blocks():
                            late += 1
                        seq.record_query(layer, q[layer, (step - 1) % STRIDE], stream)
                        seq.release(layer, stream)
                stream.synchronize()
                client.step()
            stats = seq.stats()
            print({k: stats[k] for k in ("blocks_loaded", "blocks_already_resident",
                                          "selections_published", "max_staleness_steps")})
            if late:
                print(f"{late} (step, layer) tables missed the attended block after stride + 1 steps")
            if stats["selections_published"] < 10 or stats["blocks_loaded"] == 0:
                failures += 1
                print("too few selections published or no blocks loaded")
            failures += late
    finally:
        server.terminate()
        server.wait()
    print("torch client check:", "OK" if failures == 0 else f"{failures} FAILURES")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
