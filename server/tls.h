// Transport credentials of kvstar_server: insecure (the loopback sidecar default) or TLS from PEM
// files, optionally requiring client certificates signed by a given CA (mutual TLS).
#ifndef KVSTAR_SERVER_TLS_H_
#define KVSTAR_SERVER_TLS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/security/server_credentials.h"

namespace kvstar::server {

struct TlsFiles {
  std::string cert_file;       // PEM certificate chain; empty (with key_file empty): no TLS
  std::string key_file;        // PEM private key of the first certificate
  std::string client_ca_file;  // PEM CA bundle; set: clients must present a certificate it signed
};

// Reads the files and builds the credentials. Fails with INVALID_ARGUMENT naming the flag when
// only one of cert/key is given, a client CA is given without them, or a file is unreadable,
// empty or holds no PEM block of the expected kind. Certificates are not parsed further here:
// a key that does not match its certificate makes the listener fail at start, which the caller
// reports.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files);

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_TLS_H_
