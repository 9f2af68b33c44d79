"""kvstar client for Python engines: a ctypes wrapper over libkvstar_client.so (no compiled
extension). See client/include/kvstar/client.h for what each call does.

Buffers may be torch tensors (their data pointer; CUDA tensors count as device memory), numpy
arrays (.ctypes.data), bytes / bytearray / memoryview-able objects (host memory), or raw integer
addresses (pass where=DEVICE for device memory). torch and numpy are never imported here.

The library is found through $KVSTAR_LIB, next to this package, in the repository's bazel-bin, or
on the loader's search path.
"""
import ctypes
import os

__all__ = ["Client", "Sequence", "KvstarError", "reserved_slots", "slot_pool_for", "HOST", "DEVICE", "BACKEND_AUTO", "BACKEND_HOST",
           "BACKEND_CUDA", "BF16", "FP16", "FP32"]

HOST, DEVICE = 0, 1
BACKEND_AUTO, BACKEND_HOST, BACKEND_CUDA = 0, 1, 2
BF16, FP16, FP32 = 1, 2, 3
_DTYPE_BY_NAME = {"bfloat16": BF16, "bf16": BF16, "float16": FP16, "fp16": FP16,
                  "float32": FP32, "fp32": FP32}


class KvstarError(RuntimeError):
    """A failed call: `code` is the absl/gRPC status code, str() the library's message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class _Profile(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_uint32), ("num_q_heads", ctypes.c_uint32),
                ("num_kv_heads", ctypes.c_uint32), ("head_dim", ctypes.c_uint32),
                ("block_size", ctypes.c_uint32), ("dtype", ctypes.c_uint32)]


class _Config(ctypes.Structure):
    _fields_ = [("init_window_sz", ctypes.c_uint32), ("local_window_sz", ctypes.c_uint32),
                ("sparse_ratio", ctypes.c_float), ("retrieval_stride", ctypes.c_uint32),
                ("blk_repre_dim_prune_ratio", ctypes.c_float),
                ("blk_repre_inner_token_merge", ctypes.c_uint32),
                ("block_vote", ctypes.c_uint32), ("representation_format", ctypes.c_uint32)]


class SlotTable(ctypes.Structure):
    """What the attention kernel of one layer reads this step (see SlotTable in client.h)."""
    _fields_ = [("layer", ctypes.c_uint32), ("count", ctypes.c_uint32), ("step", ctypes.c_uint64),
                ("device_slots", ctypes.POINTER(ctypes.c_int32)),
                ("host_slots", ctypes.POINTER(ctypes.c_int32)),
                ("block_indices", ctypes.POINTER(ctypes.c_uint32)),
                ("slot_pool", ctypes.c_void_p), ("slot_bytes", ctypes.c_uint64),
                ("slots_per_layer", ctypes.c_uint32),  # always 0: slot ids index the whole pool
                ("reserved", ctypes.c_uint32),
                ("selection_step", ctypes.c_uint64)]

    def blocks(self):
        return [self.block_indices[i] for i in range(self.count)]

    def slots(self):
        return [self.host_slots[i] for i in range(self.count)]

    def slot_address(self, i):
        """Address of K of the i-th resident block (V follows K): slot ids index the whole pool."""
        return self.slot_pool + self.host_slots[i] * self.slot_bytes


class _Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "blocks_offloaded", "unacknowledged_blocks", "blocks_loaded", "bytes_loaded",
        "blocks_already_resident", "selections_published", "selections_dropped",
        "last_staleness_steps", "max_staleness_steps", "decode_step", "reserved_slots",
        "slots_held", "peak_slots_held")]


class _PoolOptions(ctypes.Structure):
    _fields_ = [("slot_bytes", ctypes.c_uint64), ("num_slots", ctypes.c_uint64),
                ("headroom_slots", ctypes.c_uint64), ("memory", ctypes.c_void_p),
                ("memory_bytes", ctypes.c_uint64)]


class _PoolStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "slot_bytes", "num_slots", "headroom_slots", "reserved_slots", "slots_in_use",
        "headroom_in_use", "peak_slots_in_use", "peak_headroom_in_use", "sequences",
        "takes_refused")]


class _ClientStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "retrievals_sent", "retrievals_skipped", "retrieve_replies", "retrievals_completed",
        "blocks_received_shared", "blocks_received_bytes", "retrieve_micros",
        "segment_wait_micros", "first_reply_micros", "load_micros",
        "call_end_micros")]


_lib = None


def _load():
    global _lib
    if _lib is not None:
        return _lib
    candidates = [os.environ.get("KVSTAR_LIB"),
                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkvstar_client.so"),
                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                               "bazel-bin", "client", "libkvstar_client.so"),
                  "libkvstar_client.so"]
    errors = []
    for path in candidates:
        if not path:
            continue
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as error:
            errors.append(f"{path}: {error}")
    else:
        raise OSError("cannot load libkvstar_client.so (set KVSTAR_LIB): " + "; ".join(errors))
    p, u32, u64, i = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int
    signatures = {
        "kvstar_last_error": ([], ctypes.c_char_p),
        "kvstar_config_default": ([ctypes.POINTER(_Config)], None),
        "kvstar_connect": ([ctypes.c_char_p, i, i, ctypes.c_char_p, ctypes.c_char_p,
                            ctypes.POINTER(p)], i),
        "kvstar_connect_tls": ([ctypes.c_char_p, i, i, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(p)], i),
        "kvstar_client_destroy": ([p], None),
        "kvstar_client_backend": ([p], i),
        "kvstar_step": ([p], i),
        "kvstar_client_flush": ([p], i),
        "kvstar_reconnect": ([p, ctypes.c_char_p], i),
        "kvstar_create_sequence": ([p, ctypes.c_char_p, ctypes.POINTER(_Profile),
                                    ctypes.POINTER(_Config), u32, u32, p, u64,
                                    ctypes.POINTER(p)], i),
        "kvstar_drop_sequence": ([p, ctypes.c_char_p], i),
        "kvstar_reserved_slots": ([ctypes.POINTER(_Profile), ctypes.POINTER(_Config), u32], u64),
        "kvstar_slot_pool_for": ([ctypes.POINTER(_Profile), ctypes.POINTER(_Config), u32, u32,
                                  ctypes.c_double, ctypes.POINTER(_PoolOptions)], i),
        "kvstar_create_slot_pool": ([p, ctypes.POINTER(_PoolOptions)], i),
        "kvstar_slot_pool_stats_get": ([p, ctypes.POINTER(_PoolStats)], i),
        "kvstar_client_stats_get": ([p, ctypes.POINTER(_ClientStats)], i),
        "kvstar_offload": ([p, u32, u32, p, p, i, p], i),
        "kvstar_append_block": ([p, u32, p, p, i, p], i),
        "kvstar_flush": ([p], i),
        "kvstar_seal": ([p, p, u32, i, p], i),
        "kvstar_reseal": ([p], i),
        "kvstar_record_query": ([p, u32, p, i, p], i),
        "kvstar_acquire": ([p, u32, p, ctypes.POINTER(SlotTable)], i),
        "kvstar_release": ([p, u32, p], i),
        "kvstar_sequence_stats_get": ([p, ctypes.POINTER(_Stats)], i),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    _lib = lib
    return lib


def _check(code):
    if code != 0:
        raise KvstarError(code, _load().kvstar_last_error().decode("utf-8", "replace"))


def _buffer(obj, where=None):
    """(address, where, keep-alive) of a tensor, array, bytes-like object or raw address."""
    if isinstance(obj, int):
        return obj, HOST if where is None else where, None
    if hasattr(obj, "data_ptr"):  # torch.Tensor, duck-typed so torch is never imported
        device = HOST if getattr(obj, "device", None) is None or obj.device.type == "cpu" else DEVICE
        return obj.data_ptr(), device if where is None else where, obj
    if hasattr(obj, "ctypes") and hasattr(obj, "__array_interface__"):  # numpy.ndarray
        return obj.ctypes.data, HOST, obj
    if isinstance(obj, bytes):
        holder = ctypes.create_string_buffer(obj, len(obj))
        return ctypes.addressof(holder), HOST, holder
    holder = (ctypes.c_char * len(memoryview(obj).cast("B"))).from_buffer(obj)
    return ctypes.addressof(holder), HOST, holder


def _profile_and_config(num_layers, num_q_heads, num_kv_heads, head_dim, dtype, block_size,
                        knobs):
    if isinstance(dtype, str) or not isinstance(dtype, int):
        dtype = _DTYPE_BY_NAME[str(dtype).replace("torch.", "")]
    profile = _Profile(num_layers, num_q_heads, num_kv_heads, head_dim, block_size, dtype)
    config = _Config()
    _load().kvstar_config_default(ctypes.byref(config))
    for name, value in knobs.items():
        if name not in dict(_Config._fields_):
            raise TypeError(f"unknown knob {name}")
        setattr(config, name, value)
    return profile, config


def reserved_slots(num_layers, num_q_heads, num_kv_heads, head_dim, max_blocks_per_layer,
                   dtype=BF16, block_size=128, **knobs):
    """Slots one sequence reserves in a shared pool (ReservedSlots in client.h): per layer the
    init and local windows plus ceil(sparse_ratio * middle blocks), times num_layers."""
    profile, config = _profile_and_config(num_layers, num_q_heads, num_kv_heads, head_dim, dtype,
                                          block_size, knobs)
    return _load().kvstar_reserved_slots(ctypes.byref(profile), ctypes.byref(config),
                                         max_blocks_per_layer)


def slot_pool_for(num_layers, num_q_heads, num_kv_heads, head_dim, max_blocks_per_layer,
                  max_sequences, headroom_fraction=0.1, dtype=BF16, block_size=128, **knobs):
    """Sizes a shared pool (SlotPoolFor in client.h): dict(slot_bytes, num_slots,
    headroom_slots), for Client.create_slot_pool(**sizes)."""
    profile, config = _profile_and_config(num_layers, num_q_heads, num_kv_heads, head_dim, dtype,
                                          block_size, knobs)
    options = _PoolOptions()
    _check(_load().kvstar_slot_pool_for(ctypes.byref(profile), ctypes.byref(config),
                                        max_blocks_per_layer, max_sequences, headroom_fraction,
                                        ctypes.byref(options)))
    return {"slot_bytes": options.slot_bytes, "num_slots": options.num_slots,
            "headroom_slots": options.headroom_slots}


def _stream(stream):
    if stream is None:
        return None
    return getattr(stream, "cuda_stream", stream)  # torch.cuda.Stream or a raw handle


class Sequence:
    """One sequence; created by Client.create_sequence."""

    def __init__(self, client, handle, sequence_id, profile):
        self._client, self._handle, self.id, self.profile = client, handle, sequence_id, profile

    def offload(self, layer, block_index, key, value, stream=None, where=None):
        k, k_where, k_keep = _buffer(key, where)
        v, _, v_keep = _buffer(value, where)
        _check(_load().kvstar_offload(self._handle, layer, block_index, k, v, k_where,
                                      _stream(stream)))
        del k_keep, v_keep

    def append_block(self, layer, key, value, stream=None, where=None):
        k, k_where, k_keep = _buffer(key, where)
        v, _, v_keep = _buffer(value, where)
        _check(_load().kvstar_append_block(self._handle, layer, k, v, k_where, _stream(stream)))
        del k_keep, v_keep

    def flush(self):
        _check(_load().kvstar_flush(self._handle))

    def seal(self, queries, num_queries, stream=None, where=None):
        address, kind, keep = _buffer(queries, where)
        _check(_load().kvstar_seal(self._handle, address, num_queries, kind, _stream(stream)))
        del keep

    def reseal(self):
        _check(_load().kvstar_reseal(self._handle))

    def record_query(self, layer, query, stream=None, where=None):
        address, kind, keep = _buffer(query, where)
        _check(_load().kvstar_record_query(self._handle, layer, address, kind, _stream(stream)))
        del keep

    def acquire(self, layer, stream=None):
        table = SlotTable()
        _check(_load().kvstar_acquire(self._handle, layer, _stream(stream), ctypes.byref(table)))
        return table

    def release(self, layer, stream=None):
        _check(_load().kvstar_release(self._handle, layer, _stream(stream)))

    def stats(self):
        stats = _Stats()
        _check(_load().kvstar_sequence_stats_get(self._handle, ctypes.byref(stats)))
        return {name: getattr(stats, name) for name, _ in _Stats._fields_}


class Client:
    """A connection to a kvstar storage node plus the local slots of its sequences."""

    def __init__(self, address, backend=BACKEND_AUTO, bearer_token=None, use_tls=False,
                 tls_root_pem=None, tls_cert_pem=None, tls_key_pem=None):
        """tls_cert_pem/tls_key_pem: the client's certificate chain and key (PEM text), for a
        server started with --tls_client_ca_file."""
        def text(value):
            return value.encode() if value else None
        handle = ctypes.c_void_p()
        _check(_load().kvstar_connect_tls(address.encode(), backend, int(use_tls),
                                          text(tls_root_pem), text(tls_cert_pem),
                                          text(tls_key_pem), text(bearer_token),
                                          ctypes.byref(handle)))
        self._handle = handle
        self._own_pools = {}  # sequence id -> the engine memory of its own pool
        self.has_slot_pool = False
        self.slot_pool_memory = None  # the memory given to create_slot_pool, if any

    @property
    def backend(self):
        return {BACKEND_HOST: "host", BACKEND_CUDA: "cuda"}.get(
            _load().kvstar_client_backend(self._handle), "unknown")

    def create_sequence(self, sequence_id, num_layers, num_q_heads, num_kv_heads, head_dim,
                        dtype=BF16, block_size=128, max_blocks_per_layer=0, slots_per_layer=0,
                        slot_pool=None, **knobs):
        """knobs: init_window_sz, local_window_sz, sparse_ratio, retrieval_stride,
        blk_repre_dim_prune_ratio, blk_repre_inner_token_merge, block_vote (0 sum, 1 max),
        representation_format (0 bf16, 1 int8).
        With a shared pool (create_slot_pool): max_blocks_per_layer is required and sizes the
        sequence's reservation; slots_per_layer and slot_pool must stay unset. Without one:
        slot_pool is a device tensor the sequence's own slots live in (else the library
        allocates them)."""
        profile, config = _profile_and_config(num_layers, num_q_heads, num_kv_heads, head_dim,
                                              dtype, block_size, knobs)
        pool, pool_bytes = None, 0
        if slot_pool is not None:
            pool, _, _ = _buffer(slot_pool, DEVICE)
            pool_bytes = slot_pool.numel() * slot_pool.element_size()
        handle = ctypes.c_void_p()
        _check(_load().kvstar_create_sequence(self._handle, sequence_id.encode(),
                                              ctypes.byref(profile), ctypes.byref(config),
                                              slots_per_layer, max_blocks_per_layer, pool,
                                              pool_bytes, ctypes.byref(handle)))
        if slot_pool is not None:
            self._own_pools[sequence_id] = slot_pool  # until drop_sequence
        return Sequence(self, handle, sequence_id, profile)

    def create_slot_pool(self, num_slots, slot_bytes, headroom_slots=0, memory=None,
                         memory_bytes=None):
        """One slot pool shared by every later sequence (Client::CreateSlotPool in client.h);
        call it before the first create_sequence. memory: a tensor of at least
        num_slots * slot_bytes bytes on the backend's device (a CUDA tensor on the CUDA backend,
        a CPU one on the host backend), kept alive by this Client, or a raw address with
        memory_bytes; None: the library allocates the pool. Slot s starts at
        SlotTable.slot_pool + s * slot_bytes. kvstar.hf.KvstarCache reads a tensor pool."""
        options = _PoolOptions(slot_bytes, num_slots, headroom_slots, None, 0)
        if memory is not None:
            options.memory, _, _ = _buffer(memory, DEVICE)
            if memory_bytes is None:
                if not hasattr(memory, "numel"):
                    raise ValueError("memory given as an address needs memory_bytes")
                memory_bytes = memory.numel() * memory.element_size()
            options.memory_bytes = memory_bytes
        _check(_load().kvstar_create_slot_pool(self._handle, ctypes.byref(options)))
        self.has_slot_pool, self.slot_pool_memory = True, memory

    def slot_pool_stats(self):
        """The shared pool's accounting (SlotPoolStats in client.h) as a dict."""
        stats = _PoolStats()
        _check(_load().kvstar_slot_pool_stats_get(self._handle, ctypes.byref(stats)))
        return {name: getattr(stats, name) for name, _ in _PoolStats._fields_}

    def stats(self):
        """Retrievals and how their blocks came (ClientStats in client.h) as a dict."""
        stats = _ClientStats()
        _check(_load().kvstar_client_stats_get(self._handle, ctypes.byref(stats)))
        return {name: getattr(stats, name) for name, _ in _ClientStats._fields_}

    def drop_sequence(self, sequence_id):
        try:
            _check(_load().kvstar_drop_sequence(self._handle, sequence_id.encode()))
        finally:
            self._own_pools.pop(sequence_id, None)

    def step(self):
        _check(_load().kvstar_step(self._handle))

    def flush(self):
        _check(_load().kvstar_client_flush(self._handle))

    def reconnect(self, address):
        _check(_load().kvstar_reconnect(self._handle, address.encode()))

    def close(self):
        if self._handle:
            _load().kvstar_client_destroy(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
