#include "server/token_auth.h"

#include <cstdio>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvstar::server {
namespace {

using ::testing::HasSubstr;

std::string WriteFile(const std::string& name, const std::string& text) {
  const char* dir = std::getenv("TEST_TMPDIR");
  const std::string path = std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
  std::ofstream(path) << text;
  return path;
}

TEST(TokenAuthTest, MapsBearerTokensToTenants) {
  auto auth = TokenAuth::LoadFile(WriteFile(
      "tokens", "# comment\n\n  aaaaaaaaaaaaaaaa1 team-a\nbbbbbbbbbbbbbbbb2   team_b.x\n"));
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_EQ((*auth)->size(), 2u);
  EXPECT_EQ(*(*auth)->TenantOf("Bearer aaaaaaaaaaaaaaaa1"), "team-a");
  EXPECT_EQ(*(*auth)->TenantOf("bearer bbbbbbbbbbbbbbbb2"), "team_b.x");
}

TEST(TokenAuthTest, MissingMalformedAndUnknownCredentialsAreUnauthenticated) {
  auto auth = TokenAuth::LoadFile(WriteFile("one", "aaaaaaaaaaaaaaaa1 team-a\n"));
  ASSERT_TRUE(auth.ok());
  const struct {
    std::string authorization, message;
  } cases[] = {{"", "missing"},
               {"Basic dXNlcjpwYXNz", "not a Bearer token"},
               {"Bearer aaaaaaaaaaaaaaaa2", "unknown bearer token"}};
  for (const auto& c : cases) {
    absl::StatusOr<std::string> tenant = (*auth)->TenantOf(c.authorization);
    EXPECT_TRUE(absl::IsUnauthenticated(tenant.status())) << c.authorization;
    EXPECT_THAT(std::string(tenant.status().message()), HasSubstr(c.message));
    EXPECT_THAT(std::string(tenant.status().message()), ::testing::Not(HasSubstr("aaaa")));
  }
}

TEST(TokenAuthTest, BadFilesNameTheLine) {
  const struct {
    std::string text, message;
  } cases[] = {
      {"short team\n", ":1: token is 5 characters"},
      {"aaaaaaaaaaaaaaaa1 team\nbbbbbbbbbbbbbbbb2\n", ":2: expected \"<token> <tenant>\""},
      {"aaaaaaaaaaaaaaaa1 bad/tenant\n", ":1: tenant \"bad/tenant\""},
      {"aaaaaaaaaaaaaaaa1 a-tenant-name-too-long\n", ":1: tenant"},
      {"aaaaaaaaaaaaaaaa1 a\naaaaaaaaaaaaaaaa1 b\n", ":2: token listed twice"},
      {"# nothing\n", "lists no token"},
  };
  int i = 0;
  for (const auto& c : cases) {
    auto auth = TokenAuth::LoadFile(WriteFile("bad" + std::to_string(i++), c.text));
    EXPECT_TRUE(absl::IsInvalidArgument(auth.status())) << c.text;
    EXPECT_THAT(std::string(auth.status().message()), HasSubstr(c.message));
  }
  EXPECT_TRUE(absl::IsNotFound(TokenAuth::LoadFile("/nonexistent/tokens").status()));
}

}  // namespace
}  // namespace kvstar::server
