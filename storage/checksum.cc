#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack instead of a heap allocation per call.
#include <xxhash.h>

#include "storage/block_store.h"

namespace kvstar::storage {

uint64_t BlockChecksum(absl::string_view key, absl::string_view value) {
  // One-shot when a part is empty: identical result to streaming, without the state setup.
  if (value.empty()) return XXH3_64bits(key.data(), key.size());
  if (key.empty()) return XXH3_64bits(value.data(), value.size());
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, key.data(), key.size());
  XXH3_64bits_update(&state, value.data(), value.size());
  return XXH3_64bits_digest(&state);
}

}  // namespace kvstar::storage
