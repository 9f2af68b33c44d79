// The gRPC channel every client-library object uses to reach a storage node: TLS or plaintext
// from ClientOptions, unlimited message sizes, and flow-control settings for large replies.
#ifndef KVSTAR_CLIENT_CHANNEL_H_
#define KVSTAR_CLIENT_CHANNEL_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"
#include "kvstar/client.h"

namespace kvstar::client_internal {

std::shared_ptr<grpc::Channel> MakeChannel(const ClientOptions& options,
                                           const std::string& address);

// INVALID_ARGUMENT for a half-given client certificate, or one given without use_tls.
absl::Status CheckTlsOptions(const ClientOptions& options);

// Sets the call's deadline (rpc_timeout_ms from now) and the bearer token, when there is one.
void PrepareContext(const ClientOptions& options, grpc::ClientContext* context);

// A gRPC status as an absl::Status with the same code; the message starts with `what`.
absl::Status FromGrpc(const grpc::Status& status, const char* what);

}  // namespace kvstar::client_internal

#endif  // KVSTAR_CLIENT_CHANNEL_H_
