// Values of the node's log lines. Every line is "event=NAME key=value ...": one line per event,
// whatever bytes an id holds.
#ifndef KVSTAR_STORAGE_LOG_VALUE_H_
#define KVSTAR_STORAGE_LOG_VALUE_H_

#include <string>

#include "absl/strings/string_view.h"

namespace kvstar::storage {

// A value for a key=value log line: as is when it is plain printable ASCII without spaces,
// quotes, backslashes or '='; otherwise double-quoted with those escaped and other bytes as \xNN,
// so an id can never break a line or forge a key. Every log line of the node is
// "event=NAME key=value ...".
std::string LogValue(absl::string_view value);

}  // namespace kvstar::storage

#endif  // KVSTAR_STORAGE_LOG_VALUE_H_
