// TokenAuth: maps the bearer token of a call ("authorization: Bearer <token>" metadata) to the
// tenant it belongs to. Every sequence is scoped by tenant, and the tenant always comes from the
// credentials, never from a request field.
//
// Thread-safe (immutable after loading).
#ifndef KVSTAR_SERVER_TOKEN_AUTH_H_
#define KVSTAR_SERVER_TOKEN_AUTH_H_

#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvstar::server {

class TokenAuth {
 public:
  // Reads `path`: one "<token> <tenant>" pair per line; blank lines and lines starting with '#'
  // are skipped. Tokens are at least 16 characters; tenants are 1..16 of [A-Za-z0-9_.-]. An
  // InvalidArgument names the line that is wrong.
  static absl::StatusOr<std::unique_ptr<TokenAuth>> LoadFile(const std::string& path);

  // The tenant of an "authorization" metadata value, or UNAUTHENTICATED saying what is wrong
  // (missing, not a bearer token, unknown token) without echoing the token.
  absl::StatusOr<std::string> TenantOf(absl::string_view authorization) const;

  size_t size() const { return tenants_.size(); }
  // Distinct tenants the tokens belong to.
  size_t tenant_count() const;

 private:
  absl::flat_hash_map<std::string, std::string> tenants_;  // token -> tenant
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_TOKEN_AUTH_H_
