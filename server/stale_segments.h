// Removal of the named shared-memory segments that servers from before per-tenant shared memory
// left in /dev/shm when they were killed. Today's segments are memfds (no name anywhere), so
// everything this removes was made by an older kvstar_server.
//
// Those servers named their segment "kvstar-<16 lowercase hex digits>" (mode 0600) and held a
// shared flock(2) on it for as long as they ran, so a segment whose exclusive flock can be taken
// was left by a server that is gone. Pids do not tell: servers in other PID namespaces
// (containers) share /dev/shm and reuse pids, while a flock is seen across them.
//
// A segment is removed only when all of these hold:
//   - its name is exactly "kvstar-" and 16 lowercase hex digits;
//   - it is a regular file (not a symlink, FIFO or directory) owned by this process's effective
//     uid: other users' files are never opened;
//   - a non-blocking exclusive flock on it succeeds: no live server holds it;
//   - the name still refers to the file that was locked when it is unlinked.
// A client that still maps a removed segment keeps its pages until it unmaps them: unlinking
// removes the name only. The even older "kvstar-<pid>-<n>" names (no flock) are left alone,
// since nothing tells whether their server runs in another PID namespace.
//
// Thread-safe (no shared state); safe to run from several servers at once.
#ifndef KVSTAR_SERVER_STALE_SEGMENTS_H_
#define KVSTAR_SERVER_STALE_SEGMENTS_H_

#include <cstdint>
#include <string>
#include <vector>

namespace kvstar::server {

struct RemovedSegment {
  std::string name;  // file name in the directory, e.g. "kvstar-0123456789abcdef"
  uint64_t bytes = 0;
};

struct StaleSegmentScan {
  std::vector<RemovedSegment> removed;
  // One line per segment that matched but could not be checked or removed (with errno's
  // text), or "DIR: ..." when the directory could not be read. Segments a live server holds
  // are not listed: keeping them is the rule.
  std::vector<std::string> errors;
};

// True for "kvstar-" followed by exactly 16 lowercase hex digits.
bool IsOldSegmentName(const std::string& name);

// Removes the stale segments in `directory` (/dev/shm in the server; tests pass their own) by the
// rules above. A directory that does not exist is not an error (nothing to remove).
StaleSegmentScan RemoveStaleSegments(const std::string& directory);

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_STALE_SEGMENTS_H_
