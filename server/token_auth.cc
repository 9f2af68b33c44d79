#include "server/token_auth.h"

#include <fstream>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kvstar::server {
namespace {

constexpr size_t kMinTokenLength = 16;
// Tenant, "/" and a 100-byte id stay within the directory store's 127-byte keys.
constexpr size_t kMaxTenantLength = 16;

bool ValidTenant(absl::string_view tenant) {
  if (tenant.empty() || tenant.size() > kMaxTenantLength) return false;
  for (char c : tenant) {
    if (!absl::ascii_isalnum(c) && c != '_' && c != '.' && c != '-') return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<TokenAuth>> TokenAuth::LoadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read tokens file ", path));
  auto auth = std::make_unique<TokenAuth>();
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    const absl::string_view text = absl::StripAsciiWhitespace(line);
    if (text.empty() || text[0] == '#') continue;
    std::vector<absl::string_view> fields = absl::StrSplit(text, ' ', absl::SkipWhitespace());
    const std::string where = absl::StrCat(path, ":", number);
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": expected \"<token> <tenant>\", found ", fields.size(), " fields"));
    }
    if (fields[0].size() < kMinTokenLength) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": token is ", fields[0].size(),
                                                     " characters, at least ", kMinTokenLength,
                                                     " required"));
    }
    if (!ValidTenant(fields[1])) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": tenant \"", fields[1], "\" must be 1..16 of [A-Za-z0-9_.-]"));
    }
    if (!auth->tenants_.emplace(fields[0], fields[1]).second) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": token listed twice"));
    }
  }
  if (auth->tenants_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("tokens file ", path, " lists no token"));
  }
  return auth;
}

absl::StatusOr<std::string> TokenAuth::TenantOf(absl::string_view authorization) const {
  if (authorization.empty()) {
    return absl::UnauthenticatedError("missing \"authorization: Bearer <token>\" metadata");
  }
  constexpr absl::string_view kBearer = "Bearer ";
  if (!absl::StartsWithIgnoreCase(authorization, kBearer)) {
    return absl::UnauthenticatedError("authorization metadata is not a Bearer token");
  }
  auto found = tenants_.find(absl::StripAsciiWhitespace(authorization.substr(kBearer.size())));
  if (found == tenants_.end()) return absl::UnauthenticatedError("unknown bearer token");
  return found->second;
}

size_t TokenAuth::tenant_count() const {
  absl::flat_hash_set<std::string> tenants;
  for (const auto& [token, tenant] : tenants_) tenants.insert(tenant);
  return tenants.size();
}

}  // namespace kvstar::server
