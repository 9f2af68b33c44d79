// The TSan build's premise: every libabsl mapped into a test process is the -fsanitize=thread
// build under /opt/kvstar-tsan-absl (deploy/build-tsan-abseil.sh), including the ones Debian's
// Protobuf and the instrumented gRPC ask for, and TSan therefore sees absl::Mutex and
// absl::Notification as synchronization; every gRPC library (gpr, upb, address_sorting, grpc,
// grpc++) is the -fsanitize=thread build under /opt/kvstar-tsan-grpc (deploy/build-tsan-grpc.sh),
// one copy each. If this fails, TSan reports from the other targets are not to be trusted. Built
// without TSan it checks the opposite: the default build never picks up the instrumented prefixes.
#include <link.h>

#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace {

constexpr char kPrefix[] = "/opt/kvstar-tsan-absl/lib/";
constexpr char kGrpcPrefix[] = "/opt/kvstar-tsan-grpc/lib/";
constexpr const char* kGrpcLibraries[] = {"/libgpr.so", "/libupb.so", "/libaddress_sorting.so",
                                          "/libgrpc.so", "/libgrpc++.so"};

std::vector<std::string> LoadedLibraries(const char* name_part) {
  struct Query {
    const char* name_part;
    std::vector<std::string> paths;
  } query{name_part, {}};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        auto* query = static_cast<Query*>(out);
        std::string path = info->dlpi_name ? info->dlpi_name : "";
        if (absl::StrContains(path, query->name_part)) query->paths.push_back(path);
        return 0;
      },
      &query);
  return query.paths;
}

std::vector<std::string> LoadedAbseilLibraries() { return LoadedLibraries("/libabsl_"); }

#ifdef __SANITIZE_THREAD__
TEST(InstrumentedAbseilTest, EveryLoadedAbseilLibraryIsTheInstrumentedOne) {
  std::vector<std::string> paths = LoadedAbseilLibraries();
  // gRPC alone pulls in dozens; a handful would mean the linker dropped them.
  EXPECT_GE(paths.size(), 30u);
  for (const std::string& path : paths) {
    EXPECT_TRUE(absl::StartsWith(path, kPrefix)) << path;
  }
}

TEST(InstrumentedAbseilTest, EveryLoadedGrpcLibraryIsTheInstrumentedOneOnce) {
  for (const char* library : kGrpcLibraries) {
    std::vector<std::string> paths = LoadedLibraries(library);
    ASSERT_EQ(paths.size(), 1u) << library;
    EXPECT_TRUE(absl::StartsWith(paths[0], kGrpcPrefix)) << paths[0];
  }
}

// Under an uninstrumented Abseil, TSan reports these plain ints as racing (and halts).
TEST(InstrumentedAbseilTest, MutexAndNotificationOrderPlainAccesses) {
  absl::Mutex mu;
  int guarded = 0;
  auto add = [&] {
    for (int i = 0; i < 1000; ++i) {
      absl::MutexLock lock(&mu);
      ++guarded;
    }
  };
  std::thread a(add), b(add);
  a.join();
  b.join();
  EXPECT_EQ(guarded, 2000);

  int handed_over = 0;
  absl::Notification ready;
  std::thread writer([&] {
    handed_over = 42;
    ready.Notify();
  });
  ready.WaitForNotification();
  EXPECT_EQ(handed_over, 42);
  writer.join();
}
#else
// The default build is untouched by the TSan one: Debian's Abseil and gRPC only.
TEST(InstrumentedAbseilTest, DefaultBuildLoadsDebiansAbseilOnly) {
  std::vector<std::string> paths = LoadedAbseilLibraries();
  EXPECT_GE(paths.size(), 30u);
  for (const std::string& path : paths) {
    EXPECT_FALSE(absl::StartsWith(path, kPrefix)) << path;
  }
}

TEST(InstrumentedAbseilTest, DefaultBuildLoadsDebiansGrpcOnly) {
  for (const char* library : kGrpcLibraries) {
    std::vector<std::string> paths = LoadedLibraries(library);
    ASSERT_EQ(paths.size(), 1u) << library;
    EXPECT_FALSE(absl::StartsWith(paths[0], kGrpcPrefix)) << paths[0];
  }
}
#endif

}  // namespace
