#include "client/channel.h"

#include <chrono>

#include "absl/strings/str_cat.h"

namespace kvstar::client_internal {

std::shared_ptr<grpc::Channel> MakeChannel(const ClientOptions& options,
                                           const std::string& address) {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (options.use_tls) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_root_certs_pem;
    ssl.pem_cert_chain = options.tls_cert_chain_pem;
    ssl.pem_private_key = options.tls_private_key_pem;
    credentials = grpc::SslCredentials(ssl);
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(-1);
  arguments.SetMaxSendMessageSize(-1);
  // Retrieve replies carry megabytes of block bytes per layer: a receive window that starts
  // small and grows by probing throttles them on fast links.
  arguments.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  arguments.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20);
  return grpc::CreateCustomChannel(address, credentials, arguments);
}

absl::Status CheckTlsOptions(const ClientOptions& options) {
  if (options.tls_cert_chain_pem.empty() != options.tls_private_key_pem.empty()) {
    return absl::InvalidArgumentError(
        "tls_cert_chain_pem and tls_private_key_pem must be given together");
  }
  if (!options.use_tls && !options.tls_cert_chain_pem.empty()) {
    return absl::InvalidArgumentError("a client certificate was given but use_tls is false");
  }
  return absl::OkStatus();
}

void PrepareContext(const ClientOptions& options, grpc::ClientContext* context) {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(options.rpc_timeout_ms));
  if (!options.bearer_token.empty()) {
    context->AddMetadata("authorization", "Bearer " + options.bearer_token);
  }
}

absl::Status FromGrpc(const grpc::Status& status, const char* what) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(what, ": ", status.error_message()));
}

}  // namespace kvstar::client_internal
