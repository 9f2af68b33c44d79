// The C API round trip (create, offload, seal, per-step acquire/record/release, stats, errors)
// against the real server, and the Python package driven through python3 on the same server.
#include "kvstar/c_api.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/client/client_test_util.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

class CApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = std::make_unique<ServerProcess>(std::vector<std::string>{
        "--backend=rocksdb", "--data_dir=" + MakeTempDir("c_api"), "--log_level=warn"});
    ASSERT_TRUE(server_->Start().ok());
  }
  std::unique_ptr<ServerProcess> server_;
};

TEST_F(CApiTest, RoundTripThroughTheCFunctions) {
  kvstar_client* client = nullptr;
  ASSERT_EQ(
      kvstar_connect(server_->address().c_str(), KVSTAR_BACKEND_HOST, 0, nullptr, nullptr, &client),
      KVSTAR_OK)
      << kvstar_last_error();
  EXPECT_EQ(kvstar_client_backend(client), KVSTAR_BACKEND_HOST);
  const ModelProfile profile = SmallProfile();
  kvstar_model_profile c_profile = {profile.num_layers, profile.num_q_heads, profile.num_kv_heads,
                                    profile.head_dim,   profile.block_size,  KVSTAR_DTYPE_FP16};
  kvstar_config config;
  kvstar_config_default(&config);
  EXPECT_EQ(config.retrieval_stride, 8u);
  EXPECT_EQ(config.representation_format, 0u);  // bf16
  config.retrieval_stride = 4;
  kvstar_sequence* sequence = nullptr;
  ASSERT_EQ(
      kvstar_create_sequence(client, "c-seq", &c_profile, &config, 0, 64, nullptr, 0, &sequence),
      KVSTAR_OK)
      << kvstar_last_error();
  const uint64_t key_bytes = profile.block_key_bytes();
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    for (uint32_t index = 0; index < 16; ++index) {
      const v1::Block block = TestBlock(kSeed, layer, index, key_bytes);
      ASSERT_EQ(kvstar_offload(sequence, layer, index, block.key().data(), block.value().data(),
                               KVSTAR_HOST, nullptr),
                KVSTAR_OK);
    }
  }
  ASSERT_EQ(kvstar_flush(sequence), KVSTAR_OK) << kvstar_last_error();
  const std::string queries = MakeQueries(profile, 4, 5);
  ASSERT_EQ(kvstar_seal(sequence, queries.data(), 4, KVSTAR_HOST, nullptr), KVSTAR_OK)
      << kvstar_last_error();
  for (uint32_t step = 0; step < 12; ++step) {
    const std::string query = MakeQueries(profile, 1, 50 + step);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      kvstar_slot_table table;
      ASSERT_EQ(kvstar_acquire(sequence, layer, nullptr, &table), KVSTAR_OK);
      SlotTable cpp_table;
      cpp_table.layer = table.layer;
      cpp_table.count = table.count;
      cpp_table.device_slots = table.device_slots;
      cpp_table.host_slots = table.host_slots;
      cpp_table.block_indices = table.block_indices;
      cpp_table.slot_pool = table.slot_pool;
      cpp_table.slot_bytes = table.slot_bytes;
      cpp_table.slots_per_layer = table.slots_per_layer;
      ExpectTableHoldsBlocks(cpp_table, key_bytes);
      ASSERT_EQ(kvstar_record_query(sequence, layer, query.data() + layer * profile.query_bytes(),
                                    KVSTAR_HOST, nullptr),
                KVSTAR_OK);
      ASSERT_EQ(kvstar_release(sequence, layer, nullptr), KVSTAR_OK);
    }
    ASSERT_EQ(kvstar_step(client), KVSTAR_OK) << kvstar_last_error();
  }
  kvstar_sequence_stats stats;
  ASSERT_EQ(kvstar_sequence_stats_get(sequence, &stats), KVSTAR_OK);
  EXPECT_EQ(stats.blocks_offloaded, kLayers * 16u);
  EXPECT_EQ(stats.decode_step, 12u);
  kvstar_client_stats client_stats;
  ASSERT_EQ(kvstar_client_stats_get(client, &client_stats), KVSTAR_OK);
  EXPECT_GT(client_stats.retrievals_sent, 0u) << "12 steps hold due retrievals";
  EXPECT_LE(client_stats.retrievals_completed, client_stats.retrievals_sent);
  EXPECT_LE(
      client_stats.first_reply_micros + client_stats.segment_wait_micros + client_stats.load_micros,
      client_stats.retrieve_micros);
  EXPECT_STREQ(kvstar_last_error(), "");
  EXPECT_EQ(kvstar_client_stats_get(nullptr, &client_stats), 3);  // INVALID_ARGUMENT

  // Errors: a code and a thread-local message naming the problem.
  kvstar_slot_table table;
  EXPECT_EQ(kvstar_acquire(sequence, kLayers, nullptr, &table), 3);  // INVALID_ARGUMENT
  EXPECT_NE(std::string(kvstar_last_error()).find("layer"), std::string::npos);
  EXPECT_EQ(kvstar_release(nullptr, 0, nullptr), 3);
  EXPECT_EQ(kvstar_drop_sequence(client, "c-seq"), KVSTAR_OK);
  EXPECT_EQ(kvstar_drop_sequence(client, "c-seq"), 5);  // NOT_FOUND
  kvstar_client_destroy(client);
}

TEST_F(CApiTest, ASharedSlotPoolServesTwoSequencesThroughTheCFunctions) {
  kvstar_client* client = nullptr;
  ASSERT_EQ(
      kvstar_connect(server_->address().c_str(), KVSTAR_BACKEND_HOST, 0, nullptr, nullptr, &client),
      KVSTAR_OK)
      << kvstar_last_error();
  const ModelProfile profile = SmallProfile();
  kvstar_model_profile c_profile = {profile.num_layers, profile.num_q_heads, profile.num_kv_heads,
                                    profile.head_dim,   profile.block_size,  KVSTAR_DTYPE_FP16};
  kvstar_slot_pool_stats pool_stats;
  EXPECT_EQ(kvstar_slot_pool_stats_get(client, &pool_stats), 9);  // FAILED_PRECONDITION
  EXPECT_EQ(kvstar_reserved_slots(&c_profile, nullptr, 16), kLayers * 7u);
  kvstar_slot_pool_options options;
  ASSERT_EQ(kvstar_slot_pool_for(&c_profile, nullptr, 16, 2, 0.5, &options), KVSTAR_OK);
  EXPECT_EQ(options.slot_bytes, 2 * profile.block_key_bytes());
  EXPECT_EQ(options.num_slots, 2 * kLayers * 7u + kLayers * 7u);
  // The engine's memory, one byte short: refused, naming the field.
  std::vector<char> memory(options.num_slots * options.slot_bytes);
  options.memory = memory.data();
  options.memory_bytes = memory.size() - 1;
  EXPECT_EQ(kvstar_create_slot_pool(client, &options), 3);
  EXPECT_NE(std::string(kvstar_last_error()).find("memory_bytes"), std::string::npos);
  options.memory_bytes = memory.size();
  ASSERT_EQ(kvstar_create_slot_pool(client, &options), KVSTAR_OK) << kvstar_last_error();

  kvstar_config config;
  kvstar_config_default(&config);
  config.retrieval_stride = 4;
  kvstar_sequence* sequences[2] = {nullptr, nullptr};
  const char* ids[2] = {"c-shared-0", "c-shared-1"};
  const uint64_t key_bytes = profile.block_key_bytes();
  const std::string queries = MakeQueries(profile, 4, 5);
  for (int i = 0; i < 2; ++i) {
    // With a shared pool, a pool of the sequence's own is refused.
    EXPECT_EQ(kvstar_create_sequence(client, ids[i], &c_profile, &config, 8, 16, nullptr, 0,
                                     &sequences[i]),
              3);
    ASSERT_EQ(kvstar_create_sequence(client, ids[i], &c_profile, &config, 0, 16, nullptr, 0,
                                     &sequences[i]),
              KVSTAR_OK)
        << kvstar_last_error();
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      for (uint32_t index = 0; index < 16; ++index) {
        const v1::Block block = TestBlock(kSeed, layer, index, key_bytes);
        ASSERT_EQ(kvstar_offload(sequences[i], layer, index, block.key().data(),
                                 block.value().data(), KVSTAR_HOST, nullptr),
                  KVSTAR_OK);
      }
    }
    ASSERT_EQ(kvstar_seal(sequences[i], queries.data(), 4, KVSTAR_HOST, nullptr), KVSTAR_OK)
        << kvstar_last_error();
  }
  for (int i = 0; i < 2; ++i) {
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      kvstar_slot_table table;
      ASSERT_EQ(kvstar_acquire(sequences[i], layer, nullptr, &table), KVSTAR_OK);
      EXPECT_EQ(table.slot_pool, memory.data());
      EXPECT_EQ(table.slots_per_layer, 0u);
      for (uint32_t j = 0; j < table.count; ++j) {
        const v1::Block block = TestBlock(kSeed, layer, table.block_indices[j], key_bytes);
        const char* slot = memory.data() + uint64_t(table.host_slots[j]) * table.slot_bytes;
        ASSERT_EQ(std::memcmp(slot, block.key().data(), key_bytes), 0);
        ASSERT_EQ(std::memcmp(slot + key_bytes, block.value().data(), key_bytes), 0);
      }
      ASSERT_EQ(kvstar_release(sequences[i], layer, nullptr), KVSTAR_OK);
    }
  }
  ASSERT_EQ(kvstar_slot_pool_stats_get(client, &pool_stats), KVSTAR_OK);
  EXPECT_EQ(pool_stats.sequences, 2u);

  EXPECT_EQ(pool_stats.reserved_slots, 2 * kLayers * 7u);
  kvstar_sequence_stats stats;
  ASSERT_EQ(kvstar_sequence_stats_get(sequences[0], &stats), KVSTAR_OK);
  EXPECT_EQ(stats.reserved_slots, kLayers * 7u);
  EXPECT_EQ(stats.slots_held, pool_stats.slots_in_use / 2);
  EXPECT_EQ(kvstar_drop_sequence(client, ids[0]), KVSTAR_OK);
  ASSERT_EQ(kvstar_slot_pool_stats_get(client, &pool_stats), KVSTAR_OK);
  EXPECT_EQ(pool_stats.sequences, 1u);
  EXPECT_EQ(pool_stats.reserved_slots, kLayers * 7u);
  EXPECT_EQ(kvstar_drop_sequence(client, ids[1]), KVSTAR_OK);
  kvstar_client_destroy(client);
}

TEST_F(CApiTest, PythonPackageDrivesTheSharedLibrary) {
  const std::string command =
      "KVSTAR_LIB=client/libkvstar_client.so PYTHONPATH=client/python /usr/bin/python3 "
      "tests/client/python_client_test.py " +
      server_->address() + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[4096];
  while (size_t read = fread(buffer, 1, sizeof(buffer), pipe)) output.append(buffer, read);
  const int status = pclose(pipe);
  EXPECT_EQ(status, 0) << output;
  EXPECT_NE(output.find("python client: OK"), std::string::npos) << output;
}

}  // namespace
}  // namespace kvstar::testing
