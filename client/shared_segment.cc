#include "client/shared_segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "kvstar/v1/kvstar.pb.h"

namespace kvstar::client_internal {
namespace {

constexpr uint32_t kMaxAnswerBytes = 8192;

// Closes the descriptor it holds unless released.
class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) : fd_(fd) {}
  ~UniqueFd() {
    if (fd_ >= 0) close(fd_);
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  void reset(int fd) {
    if (fd_ >= 0) close(fd_);
    fd_ = fd;
  }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

absl::Status Unavailable(const std::string& address, const char* what, int err) {
  return absl::UnavailableError(absl::StrCat("shared-memory socket ", address, ": ", what,
                                             err != 0 ? ": " : "",
                                             err != 0 ? std::strerror(err) : ""));
}

}  // namespace

absl::StatusOr<ReceivedSegment> ReceiveSegment(const std::string& socket_address,
                                               const std::string& bearer_token, int timeout_ms) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_address.size() < 2 || socket_address.size() + 1 > sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared-memory socket address \"", socket_address, "\" is not usable"));
  }
  std::memcpy(addr.sun_path, socket_address.data(), socket_address.size());
  socklen_t addr_length = offsetof(sockaddr_un, sun_path) + socket_address.size();
  if (socket_address[0] == '@') {
    addr.sun_path[0] = '\0';  // abstract namespace
  } else {
    addr_length += 1;
  }
  UniqueFd connection(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (connection.get() < 0) return Unavailable(socket_address, "socket", errno);
  const timeval timeout{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  setsockopt(connection.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  setsockopt(connection.get(), SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  if (connect(connection.get(), reinterpret_cast<const sockaddr*>(&addr), addr_length) != 0) {
    return Unavailable(socket_address, "connect", errno);
  }

  v1::SharedMemoryHandshakeRequest request;
  if (!bearer_token.empty()) request.set_authorization("Bearer " + bearer_token);
  const std::string payload = request.SerializeAsString();
  std::string frame(4, '\0');
  for (int i = 0; i < 4; ++i) frame[i] = static_cast<char>((payload.size() >> (8 * i)) & 0xff);
  frame += payload;
  for (size_t done = 0; done < frame.size();) {
    const ssize_t n =
        send(connection.get(), frame.data() + done, frame.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return Unavailable(socket_address, "sending the handshake", errno);
    done += static_cast<size_t>(n);
  }

  // The answer: the descriptor rides with its first byte.
  std::string answer(4 + kMaxAnswerBytes, '\0');
  size_t received = 0;
  UniqueFd segment;
  uint64_t expected = 0;
  while (received < 4 || received < 4 + expected) {
    iovec iov{answer.data() + received, answer.size() - received};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr message{};
    message.msg_iov = &iov;
    message.msg_iovlen = 1;
    message.msg_control = control;
    message.msg_controllen = sizeof(control);
    const ssize_t n = recvmsg(connection.get(), &message, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Unavailable(socket_address, "reading the answer", errno);
    if (n == 0) return Unavailable(socket_address, "the server closed without answering", 0);
    for (cmsghdr* header = CMSG_FIRSTHDR(&message); header != nullptr;
         header = CMSG_NXTHDR(&message, header)) {
      if (header->cmsg_level == SOL_SOCKET && header->cmsg_type == SCM_RIGHTS &&
          header->cmsg_len >= CMSG_LEN(sizeof(int))) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(header), sizeof(int));
        segment.reset(fd);
      }
    }
    received += static_cast<size_t>(n);
    if (received >= 4) {
      const auto* bytes = reinterpret_cast<const unsigned char*>(answer.data());
      expected = bytes[0] | bytes[1] << 8 | bytes[2] << 16 | uint64_t{bytes[3]} << 24;
      if (expected > kMaxAnswerBytes) {
        return absl::DataLossError(absl::StrCat("shared-memory socket ", socket_address,
                                                ": an answer of ", expected, " bytes"));
      }
    }
  }
  v1::SharedMemoryHandshakeResponse response;
  if (!response.ParseFromArray(answer.data() + 4, static_cast<int>(expected))) {
    return absl::DataLossError(absl::StrCat("shared-memory socket ", socket_address,
                                            ": not a SharedMemoryHandshakeResponse"));
  }
  if (response.code() != 0) {
    return absl::Status(
        static_cast<absl::StatusCode>(response.code()),
        absl::StrCat("the server refused the shared-memory handshake: ", response.message()));
  }
  if (segment.get() < 0) {
    return absl::DataLossError(
        absl::StrCat("shared-memory handshake on ", socket_address, ": no descriptor came"));
  }
  struct stat info;
  if (fstat(segment.get(), &info) != 0 ||
      static_cast<uint64_t>(info.st_size) != response.segment_bytes() ||
      response.segment_bytes() == 0) {
    return absl::DataLossError(absl::StrCat("segment ", response.segment(), " holds ", info.st_size,
                                            " bytes, the server said ", response.segment_bytes()));
  }
  // Unsealed, the server (or anyone holding the descriptor) could shrink it under our mapping,
  // and reading it would raise SIGBUS.
  const int seals = fcntl(segment.get(), F_GET_SEALS);
  if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
    return absl::DataLossError(
        absl::StrCat("segment ", response.segment(), " is not sealed against shrinking"));
  }
  return ReceivedSegment{segment.release(), response.segment(), response.segment_bytes()};
}

absl::StatusOr<std::unique_ptr<SharedSegment>> SharedSegment::Receive(
    const std::string& socket_address, const std::string& bearer_token, int timeout_ms,
    DeviceBackend* backend) {
  absl::StatusOr<ReceivedSegment> received =
      ReceiveSegment(socket_address, bearer_token, timeout_ms);
  if (!received.ok()) return received.status();
  UniqueFd fd(received->fd);
  void* base = mmap(nullptr, received->bytes, PROT_READ, MAP_SHARED, fd.get(), 0);
  if (base == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("mmap of segment ", received->id, " (", received->bytes,
                                            " bytes): ", std::strerror(errno)));
  }
  // The mapping keeps the memfd; the descriptor closes here.
  if (absl::Status status = backend->RegisterHost(base, received->bytes, /*read_only=*/true);
      !status.ok()) {
    munmap(base, received->bytes);
    return absl::Status(status.code(),
                        absl::StrCat("registering segment ", received->id, ": ", status.message()));
  }
  return std::unique_ptr<SharedSegment>(
      new SharedSegment(received->id, static_cast<char*>(base), received->bytes, backend));
}

SharedSegment::SharedSegment(std::string name, char* base, uint64_t size, DeviceBackend* backend)
    : name_(std::move(name)), base_(base), size_(size), backend_(backend) {}

SharedSegment::~SharedSegment() {
  backend_->UnregisterHost(base_);
  munmap(base_, size_);
}

const char* SharedSegment::Region(uint64_t offset, uint64_t length) const {
  if (offset > size_ || length > (size_ - offset) / 2) return nullptr;
  return base_ + offset;
}

absl::StatusOr<std::string> ThisHostId() {
  std::ifstream file("/proc/sys/kernel/random/boot_id");
  std::string id;
  if (!std::getline(file, id) || id.empty()) {
    return absl::UnavailableError("cannot read /proc/sys/kernel/random/boot_id");
  }
  return std::string(absl::StripAsciiWhitespace(id));
}

}  // namespace kvstar::client_internal
