// TSan's suppressions, compiled into every binary of --config=tsan (.bazelrc links this library
// into each cc_binary and cc_test through --custom_malloc), so that the kvstar_server processes
// the integration tests start carry them too. Each is a race: entry, which TSan matches against
// every frame of both stacks of a report. The functions named are OpenSSL's, RocksDB's and
// gRPC's, work on their own library's private state and call no kvstar code: an access made by
// kvstar's code never has one of them on its stack, so a report matches only when one of its two
// accesses is that function's own, on that library's memory.
extern "C" const char* __tsan_default_suppressions() {
  return
      // Debian's RocksDB 7.8 (not instrumented): in every kvstar_server on the RocksDB backend, at
      // start-up. RegisterCacheDeleterRole (on the opening thread) and CopyCacheDeleterRoleMap
      // (on a RocksDB background thread) lock a mutex inside a function-local static of
      // librocksdb that the other thread constructed; the guard's acquire load that orders the
      // two is inline in librocksdb, where TSan cannot see it.
      "race:rocksdb::RegisterCacheDeleterRole\n"
      "race:rocksdb::CopyCacheDeleterRoleMap\n"
      // Debian's OpenSSL 3 (not instrumented). Seen: an SSL_CTX's lock freed
      // (CRYPTO_THREAD_lock_free from tsi_ssl_handshaker_factory_destroy) on a gRPC thread after
      // the main thread last took it; OpenSSL's own reference counts, atomics inside libcrypto,
      // order the two.
      "race:CRYPTO_THREAD_lock_free\n"
      // gRPC 1.51's reflection plugin fills the service list (SetServiceList, from
      // ProtoServerReflectionPlugin::Finish) after ServerBuilder::BuildAndStart has started the
      // server, unsynchronized with a ListServices call that comes in first. kvstar_server writes
      // its port file only after BuildAndStart returns, so no client of it can come first, but
      // that order goes through the file system, which TSan cannot see.
      "race:grpc::ProtoServerReflection::SetServiceList\n";
}
