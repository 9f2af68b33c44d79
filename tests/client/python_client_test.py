"""Drives the kvstar Python package (ctypes over libkvstar_client.so) against a running server at
$KVSTAR_ADDRESS on the host backend, with plain bytes buffers (no numpy or torch needed)."""
import ctypes
import random
import sys

import kvstar

LAYERS, Q_HEADS, KV_HEADS, DIM, BLOCK, BLOCKS, STRIDE = 2, 4, 2, 64, 128, 12, 4
KEY_BYTES = BLOCK * KV_HEADS * DIM * 2
QUERY_BYTES = Q_HEADS * DIM * 2


def tame_fp16(seed, size):
    data = bytearray(random.Random(seed).randbytes(size))
    for i in range(1, size, 2):
        data[i] &= 0x3B  # finite fp16 below 2
    return bytes(data)


def block(layer, index):
    return (tame_fp16(layer * 1000 + index * 2, KEY_BYTES),
            tame_fp16(layer * 1000 + index * 2 + 1, KEY_BYTES))


def main(address):
    with kvstar.Client(address, backend=kvstar.BACKEND_HOST) as client:
        assert client.backend == "host", client.backend
        seq = client.create_sequence("py-seq", LAYERS, Q_HEADS, KV_HEADS, DIM, dtype="float16",
                                     max_blocks_per_layer=BLOCKS + 8, retrieval_stride=STRIDE)
        for layer in range(LAYERS):
            for index in range(BLOCKS):
                key, value = block(layer, index)
                seq.offload(layer, index, key, bytearray(value))
        seq.flush()
        assert seq.stats()["blocks_offloaded"] == LAYERS * BLOCKS
        seq.seal(tame_fp16(7, LAYERS * STRIDE * QUERY_BYTES), STRIDE)
        for step in range(3 * STRIDE):
            for layer in range(LAYERS):
                table = seq.acquire(layer)
                assert table.count > 0 and table.blocks() == sorted(table.blocks())
                for i, index in enumerate(table.blocks()):
                    key, value = block(layer, index)
                    got = ctypes.string_at(table.slot_address(i), 2 * KEY_BYTES)
                    assert got == key + value, f"slot of layer {layer} block {index} differs"
                seq.record_query(layer, tame_fp16(100 + step, QUERY_BYTES))
                seq.release(layer)
            client.step()
        stats = seq.stats()
        assert stats["decode_step"] == 3 * STRIDE, stats
        assert stats["selections_published"] >= LAYERS, stats
        retrievals = client.stats()
        assert retrievals["retrievals_sent"] >= 1, retrievals
        assert retrievals["retrievals_completed"] <= retrievals["retrievals_sent"], retrievals
        try:
            seq.acquire(LAYERS)
            raise AssertionError("acquire of a layer out of range succeeded")
        except kvstar.KvstarError as error:
            assert error.code == 3 and "layer" in str(error), (error.code, str(error))
        client.drop_sequence("py-seq")
        try:
            client.drop_sequence("py-seq")
            raise AssertionError("second drop succeeded")
        except kvstar.KvstarError as error:
            assert error.code == 5, error.code
    shared_pool(address)
    print("python client: OK")


def shared_pool(address):
    """Two sequences over one shared pool in a bytearray the 'engine' owns; dropping one frees
    its reservation for a third."""
    shape = dict(num_layers=LAYERS, num_q_heads=Q_HEADS, num_kv_heads=KV_HEADS, head_dim=DIM,
                 dtype="float16", retrieval_stride=STRIDE)
    reserved = kvstar.reserved_slots(max_blocks_per_layer=BLOCKS, **shape)
    assert reserved == LAYERS * (3 + 3), reserved  # windows + ceil(9 * 0.25)
    sizes = kvstar.slot_pool_for(max_blocks_per_layer=BLOCKS, max_sequences=2,
                                 headroom_fraction=0.5, **shape)
    assert sizes["slot_bytes"] == 2 * KEY_BYTES and sizes["num_slots"] == 3 * reserved, sizes
    memory = bytearray(sizes["num_slots"] * sizes["slot_bytes"])
    base = ctypes.addressof((ctypes.c_char * len(memory)).from_buffer(memory))
    with kvstar.Client(address, backend=kvstar.BACKEND_HOST) as client:
        try:
            client.slot_pool_stats()
            raise AssertionError("slot_pool_stats without a pool succeeded")
        except kvstar.KvstarError as error:
            assert error.code == 9, error.code
        client.create_slot_pool(memory=base, memory_bytes=len(memory), **sizes)
        sequences = []
        for name in ("py-shared-0", "py-shared-1", "py-shared-2"):
            try:
                seq = client.create_sequence(name, max_blocks_per_layer=BLOCKS, **shape)
            except kvstar.KvstarError as error:
                assert name == "py-shared-2" and error.code == 8, (name, error.code)
                assert "reserved slots" in str(error), str(error)
                break
            for layer in range(LAYERS):
                for index in range(BLOCKS):
                    key, value = block(layer, index)
                    seq.offload(layer, index, key, value)
            seq.seal(tame_fp16(7, LAYERS * STRIDE * QUERY_BYTES), STRIDE)
            sequences.append(seq)
        slots = []
        for seq in sequences:
            held = set()
            for layer in range(LAYERS):
                table = seq.acquire(layer)
                assert table.slot_pool == base and table.slots_per_layer == 0
                for i, index in enumerate(table.blocks()):
                    key, value = block(layer, index)
                    assert ctypes.string_at(table.slot_address(i), 2 * KEY_BYTES) == key + value
                held.update(table.slots())
                seq.release(layer)
            slots.append(held)
        assert not slots[0] & slots[1], "two sequences share a slot"
        stats = client.slot_pool_stats()
        assert stats["sequences"] == 2 and stats["reserved_slots"] == 2 * reserved, stats
        client.drop_sequence("py-shared-0")
        third = client.create_sequence("py-shared-2", max_blocks_per_layer=BLOCKS, **shape)
        assert client.slot_pool_stats()["reserved_slots"] == 2 * reserved
        assert third.stats()["reserved_slots"] == reserved
        client.drop_sequence("py-shared-2")
        client.drop_sequence("py-shared-1")


if __name__ == "__main__":
    main(sys.argv[1])
