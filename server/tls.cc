#include "server/tls.h"

#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/security/server_credentials.h"

namespace kvstar::server {
namespace {

// The file's bytes, which must hold a PEM block whose label contains `label`.
absl::StatusOr<std::string> ReadPem(const std::string& flag, const std::string& path,
                                    const std::string& label) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": cannot read it"));
  std::ostringstream bytes;
  bytes << in.rdbuf();
  std::string pem = bytes.str();
  if (pem.empty()) return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, " is empty"));
  if (!absl::StrContains(pem, "-----BEGIN ") || !absl::StrContains(pem, label)) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, " holds no PEM \"", label, "\" block"));
  }
  return pem;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files) {
  if (files.cert_file.empty() && files.key_file.empty()) {
    if (!files.client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca_file needs --tls_cert_file and --tls_key_file");
    }
    return grpc::InsecureServerCredentials();
  }
  if (files.cert_file.empty() || files.key_file.empty()) {
    return absl::InvalidArgumentError("--tls_cert_file and --tls_key_file must be given together");
  }
  absl::StatusOr<std::string> cert = ReadPem("--tls_cert_file", files.cert_file, "CERTIFICATE");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPem("--tls_key_file", files.key_file, "PRIVATE KEY");
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_key_cert_pairs.push_back({*std::move(key), *std::move(cert)});
  if (!files.client_ca_file.empty()) {
    absl::StatusOr<std::string> ca =
        ReadPem("--tls_client_ca_file", files.client_ca_file, "CERTIFICATE");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *std::move(ca);
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

}  // namespace kvstar::server
