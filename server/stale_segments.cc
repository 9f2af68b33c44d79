#include "server/stale_segments.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvstar::server {
namespace {

constexpr char kPrefix[] = "kvstar-";
constexpr size_t kPrefixLength = sizeof(kPrefix) - 1;
constexpr size_t kHexDigits = 16;

bool SameFile(const struct stat& a, const struct stat& b) {
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

// Ours to remove at all: a regular file of this effective uid.
bool OwnRegularFile(const struct stat& st) { return S_ISREG(st.st_mode) && st.st_uid == geteuid(); }

// Removes `name` from `dir_fd` when it is a stale segment. Appends to `scan`.
void RemoveIfStale(int dir_fd, const std::string& directory, const std::string& name,
                   StaleSegmentScan* scan) {
  const std::string path = absl::StrCat(directory, "/", name);
  auto fail = [&](const char* step, int err) {
    scan->errors.push_back(absl::StrCat(path, ": ", step, ": ", std::strerror(err)));
  };
  struct stat listed;
  if (fstatat(dir_fd, name.c_str(), &listed, AT_SYMLINK_NOFOLLOW) != 0) {
    if (errno != ENOENT) fail("stat", errno);  // ENOENT: another server removed it meanwhile
    return;
  }
  if (!OwnRegularFile(listed)) return;
  // O_NOFOLLOW and O_NONBLOCK: a name swapped for a symlink or a FIFO since the stat is neither
  // followed nor waited on.
  const int fd = openat(dir_fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    if (errno != ENOENT) fail("open", errno);
    return;
  }
  struct stat opened;
  if (fstat(fd, &opened) != 0) {
    fail("fstat", errno);
  } else if (OwnRegularFile(opened) && SameFile(opened, listed)) {
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      // EWOULDBLOCK: a live server holds it, which is the reason to keep it.
      if (errno != EWOULDBLOCK) fail("flock", errno);
    } else {
      // The name must still be the file locked. Only this uid (or root) can replace a file of
      // this uid in a sticky directory like /dev/shm, and old servers never reused a name.
      struct stat now;
      if (fstatat(dir_fd, name.c_str(), &now, AT_SYMLINK_NOFOLLOW) == 0 && SameFile(now, opened)) {
        if (unlinkat(dir_fd, name.c_str(), 0) == 0) {
          scan->removed.push_back({name, static_cast<uint64_t>(opened.st_size)});
        } else if (errno != ENOENT) {
          fail("unlink", errno);
        }
      }
    }
  }
  close(fd);
}

}  // namespace

bool IsOldSegmentName(const std::string& name) {
  if (name.size() != kPrefixLength + kHexDigits || name.compare(0, kPrefixLength, kPrefix) != 0) {
    return false;
  }
  for (size_t i = kPrefixLength; i < name.size(); ++i) {
    const char c = name[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

StaleSegmentScan RemoveStaleSegments(const std::string& directory) {
  StaleSegmentScan scan;
  const int dir_fd = open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) {
    if (errno != ENOENT) {
      scan.errors.push_back(absl::StrCat(directory, ": open: ", std::strerror(errno)));
    }
    return scan;
  }
  // The names first, then the checks: the listing is not disturbed by the removals.
  std::vector<std::string> names;
  const int list_fd = dup(dir_fd);
  DIR* dir = list_fd >= 0 ? fdopendir(list_fd) : nullptr;
  if (dir == nullptr) {
    scan.errors.push_back(absl::StrCat(directory, ": list: ", std::strerror(errno)));
    if (list_fd >= 0) close(list_fd);
  } else {
    while (const struct dirent* entry = readdir(dir)) {
      if (IsOldSegmentName(entry->d_name)) names.emplace_back(entry->d_name);
    }
    closedir(dir);
  }
  for (const std::string& name : names) RemoveIfStale(dir_fd, directory, name, &scan);
  close(dir_fd);
  return scan;
}

}  // namespace kvstar::server
