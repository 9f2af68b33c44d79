#include "server/segment_handoff.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "kvstar/v1/kvstar.pb.h"
#include "spdlog/spdlog.h"
#include "storage/log_value.h"

namespace kvstar::server {
namespace {

constexpr uint32_t kMaxMessageBytes = 8192;

std::string RandomAbstractName() {
  uint64_t bits = 0;
  std::ifstream("/dev/urandom", std::ios::binary)
      .read(reinterpret_cast<char*>(&bits), sizeof(bits));
  bits ^= static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  return absl::StrCat("@kvstar-", absl::Hex(bits, absl::kZeroPad16));
}

// sockaddr_un of "@name" (abstract: a leading NUL, no terminator) or of a path.
absl::StatusOr<std::pair<sockaddr_un, socklen_t>> SocketAddress(const std::string& address) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (address.size() + 1 > sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("--shared_memory_socket ", address, " is over ",
                                                   sizeof(addr.sun_path) - 1, " characters"));
  }
  if (address.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("--shared_memory_socket \"", address, "\" is too short"));
  }
  std::memcpy(addr.sun_path, address.data(), address.size());
  socklen_t length = offsetof(sockaddr_un, sun_path) + address.size();
  if (address[0] == '@') {
    addr.sun_path[0] = '\0';
  } else {
    length += 1;  // the path's terminator
  }
  return std::make_pair(addr, length);
}

// Reads exactly `size` bytes; false on error, timeout or end of stream.
bool ReadFully(int fd, char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = recv(fd, data, size, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// Sends the framed response, with `segment_fd` attached when it is not -1.
bool SendResponse(int connection, const v1::SharedMemoryHandshakeResponse& response,
                  int segment_fd) {
  const std::string payload = response.SerializeAsString();
  std::string frame(4, '\0');
  for (int i = 0; i < 4; ++i) frame[i] = static_cast<char>((payload.size() >> (8 * i)) & 0xff);
  frame += payload;
  iovec iov{frame.data(), frame.size()};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  if (segment_fd >= 0) {
    message.msg_control = control;
    message.msg_controllen = sizeof(control);
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(header), &segment_fd, sizeof(int));
  }
  ssize_t sent;
  do {
    sent = sendmsg(connection, &message, MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) return false;
  // The descriptor went with the first byte; the rest (if any) follows plainly.
  size_t done = static_cast<size_t>(sent);
  while (done < frame.size()) {
    const ssize_t n = send(connection, frame.data() + done, frame.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SegmentHandoff>> SegmentHandoff::Start(std::string address,
                                                                      TenantOf tenant_of,
                                                                      TenantSegments* segments) {
  if (address.empty()) address = RandomAbstractName();
  absl::StatusOr<std::pair<sockaddr_un, socklen_t>> addr = SocketAddress(address);
  if (!addr.ok()) return addr.status();
  const bool on_file_system = address[0] != '@';
  auto error = [&](const char* what, int err) {
    return absl::InternalError(
        absl::StrCat(what, " of shared-memory socket ", address, ": ", std::strerror(err)));
  };
  if (on_file_system) {
    struct stat info;
    if (lstat(address.c_str(), &info) == 0) {
      if (!S_ISSOCK(info.st_mode)) {
        return absl::AlreadyExistsError(
            absl::StrCat("--shared_memory_socket ", address, " exists and is not a socket"));
      }
      // A socket file nobody accepts on was left by a server that died: replace it.
      const int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      const bool live =
          probe >= 0 &&
          connect(probe, reinterpret_cast<const sockaddr*>(&addr->first), addr->second) == 0;
      if (probe >= 0) close(probe);
      if (live) {
        return absl::AlreadyExistsError(
            absl::StrCat("--shared_memory_socket ", address, ": another server listens there"));
      }
      unlink(address.c_str());
    }
  }
  const int listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd < 0) return error("socket", errno);
  if (bind(listen_fd, reinterpret_cast<const sockaddr*>(&addr->first), addr->second) != 0) {
    const int err = errno;
    close(listen_fd);
    return error("bind", err);
  }
  if ((on_file_system && chmod(address.c_str(), 0666) != 0) || listen(listen_fd, 64) != 0) {
    const int err = errno;
    close(listen_fd);
    if (on_file_system) unlink(address.c_str());
    return error("listen", err);
  }
  const int stop_fd = eventfd(0, EFD_CLOEXEC);
  if (stop_fd < 0) {
    const int err = errno;
    close(listen_fd);
    if (on_file_system) unlink(address.c_str());
    return error("eventfd", err);
  }
  return std::unique_ptr<SegmentHandoff>(
      new SegmentHandoff(std::move(address), listen_fd, stop_fd, std::move(tenant_of), segments));
}

SegmentHandoff::SegmentHandoff(std::string address, int listen_fd, int stop_fd, TenantOf tenant_of,
                               TenantSegments* segments)
    : address_(std::move(address)),
      listen_fd_(listen_fd),
      stop_fd_(stop_fd),
      tenant_of_(std::move(tenant_of)),
      segments_(segments) {
  thread_ = std::thread([this] { Serve(); });
}

SegmentHandoff::~SegmentHandoff() {
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t written = write(stop_fd_, &one, sizeof(one));
  thread_.join();
  close(listen_fd_);
  close(stop_fd_);
  if (address_[0] != '@') unlink(address_.c_str());
}

void SegmentHandoff::Serve() {
  while (true) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("event=segment_handoff_stopped message={}",
                    storage::LogValue(std::strerror(errno)));
      return;
    }
    if (fds[1].revents != 0) return;
    if ((fds[0].revents & POLLIN) == 0) continue;
    const int connection = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (connection < 0) continue;  // the client gave up already, or out of descriptors for now
    Answer(connection);
    close(connection);
  }
}

void SegmentHandoff::Answer(int connection) {
  const timeval timeout{kIoTimeoutMs / 1000, (kIoTimeoutMs % 1000) * 1000};
  setsockopt(connection, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  setsockopt(connection, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  ucred peer{};
  socklen_t peer_length = sizeof(peer);
  getsockopt(connection, SOL_SOCKET, SO_PEERCRED, &peer, &peer_length);

  v1::SharedMemoryHandshakeResponse response;
  auto refuse = [&](const absl::Status& status) {
    response.set_code(static_cast<int>(status.code()));
    response.set_message(std::string(status.message()));
    spdlog::warn("event=segment_handoff_refused peer_pid={} peer_uid={} code={} message={}",
                 peer.pid, peer.uid, absl::StatusCodeToString(status.code()),
                 storage::LogValue(status.message()));
    SendResponse(connection, response, -1);
  };
  unsigned char length_bytes[4];
  if (!ReadFully(connection, reinterpret_cast<char*>(length_bytes), 4)) return;
  const uint32_t length = length_bytes[0] | length_bytes[1] << 8 | length_bytes[2] << 16 |
                          static_cast<uint32_t>(length_bytes[3]) << 24;
  if (length > kMaxMessageBytes) {
    refuse(absl::InvalidArgumentError(absl::StrCat(
        "handshake request of ", length, " bytes, over the limit of ", kMaxMessageBytes)));
    return;
  }
  std::string payload(length, '\0');
  v1::SharedMemoryHandshakeRequest request;
  if (!ReadFully(connection, payload.data(), length)) return;
  if (!request.ParseFromString(payload)) {
    refuse(absl::InvalidArgumentError("not a SharedMemoryHandshakeRequest"));
    return;
  }
  absl::StatusOr<std::string> tenant = tenant_of_(request.authorization());
  if (!tenant.ok()) {
    refuse(tenant.status());
    return;
  }
  absl::StatusOr<SharedMemoryArena*> segment = segments_->Obtain(*tenant);
  if (!segment.ok()) {
    refuse(segment.status());
    return;
  }
  response.set_code(0);
  response.set_segment((*segment)->id());
  response.set_segment_bytes((*segment)->size());
  if (SendResponse(connection, response, (*segment)->fd())) {
    spdlog::info("event=segment_handed_over tenant={} segment={} bytes={} peer_pid={} peer_uid={}",
                 storage::LogValue(*tenant), (*segment)->id(), (*segment)->size(), peer.pid,
                 peer.uid);
  }
}

}  // namespace kvstar::server
