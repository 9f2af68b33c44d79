// SegmentHandoff: the Unix stream socket on which co-located clients receive their tenant's
// shared-memory segment (ServerInfoResponse.shared_memory_socket). A client sends a
// SharedMemoryHandshakeRequest with its bearer token; the handoff checks the token, takes the
// tenant's segment from TenantSegments (creating it on first use) and answers with a
// SharedMemoryHandshakeResponse that carries the segment's descriptor (SCM_RIGHTS). A wrong or
// missing token, a malformed request or no room get an answer with the error and no descriptor.
// See kvstar.proto for the framing.
//
// One thread accepts and answers connections one at a time; a client that sends nothing is
// dropped after kIoTimeoutMs, so it delays others by at most that.
//
// Thread-safe: construct, read address(), destroy.
#ifndef KVSTAR_SERVER_SEGMENT_HANDOFF_H_
#define KVSTAR_SERVER_SEGMENT_HANDOFF_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/tenant_segments.h"

namespace kvstar::server {

class SegmentHandoff {
 public:
  // The tenant of an "authorization" value, or UNAUTHENTICATED saying what is wrong.
  using TenantOf = std::function<absl::StatusOr<std::string>(absl::string_view authorization)>;

  static constexpr int kIoTimeoutMs = 2000;

  // Listens on `address`: "" picks a fresh name in the abstract namespace ("@kvstar-<16 hex
  // digits>": nothing on any file system, gone with the process); "@name" is that abstract name;
  // anything else is a file-system path, created mode 0666 (the token is what admits a client),
  // replacing a socket file no server listens on, and removed by the destructor. `segments`
  // must outlive the handoff. Errors name the address and the failing step.
  static absl::StatusOr<std::unique_ptr<SegmentHandoff>> Start(std::string address,
                                                               TenantOf tenant_of,
                                                               TenantSegments* segments);
  // Stops listening and joins the thread.
  ~SegmentHandoff();
  SegmentHandoff(const SegmentHandoff&) = delete;
  SegmentHandoff& operator=(const SegmentHandoff&) = delete;

  // What GetServerInfo advertises: "@name" or the path.
  const std::string& address() const { return address_; }

 private:
  SegmentHandoff(std::string address, int listen_fd, int stop_fd, TenantOf tenant_of,
                 TenantSegments* segments);
  void Serve();
  void Answer(int connection);

  const std::string address_;
  const int listen_fd_;
  const int stop_fd_;  // an eventfd: readable once the destructor runs
  const TenantOf tenant_of_;
  TenantSegments* const segments_;
  std::thread thread_;
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_SEGMENT_HANDOFF_H_
