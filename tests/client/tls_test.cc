// TLS between the client library and the real kvstar_server, with certificates this test makes
// with openssl: the server speaks TLS only, clients must trust its CA, and with
// --tls_client_ca_file every client must present a certificate that CA signed.
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstar/client.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "tests/client/client_test_util.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

// Runs a shell command; true when it exited 0.
bool Shell(const std::string& command) { return std::system(command.c_str()) == 0; }

// A CA, and a certificate it signs for `name` with the given extensions.
struct Pki {
  std::string dir;

  bool MakeCa(const std::string& ca) const {
    return Shell(absl::StrCat("cd ", dir, " && openssl req -x509 -newkey ec -pkeyopt ",
                              "ec_paramgen_curve:prime256v1 -nodes -keyout ", ca, ".key -out ", ca,
                              ".pem -days 2 -subj /CN=", ca, " 2>/dev/null"));
  }
  bool Sign(const std::string& ca, const std::string& name, const std::string& extensions) const {
    std::ofstream(dir + "/" + name + ".ext") << extensions << "\n";
    return Shell(absl::StrCat(
        "cd ", dir, " && openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes ",
        "-keyout ", name, ".key -out ", name, ".csr -subj /CN=", name, " 2>/dev/null && ",
        "openssl x509 -req -in ", name, ".csr -CA ", ca, ".pem -CAkey ", ca, ".key ",
        "-CAcreateserial -days 2 -extfile ", name, ".ext -out ", name, ".pem 2>/dev/null"));
  }
  std::string Pem(const std::string& name) const { return ReadFile(dir + "/" + name + ".pem"); }
  std::string Key(const std::string& name) const { return ReadFile(dir + "/" + name + ".key"); }
  std::string Path(const std::string& file) const { return dir + "/" + file; }
};

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    pki_ = new Pki{MakeTempDir("pki")};
    ok_ = pki_->MakeCa("ca") && pki_->MakeCa("other-ca") &&
          pki_->Sign("ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost") &&
          pki_->Sign("ca", "client", "extendedKeyUsage=clientAuth") &&
          pki_->Sign("other-ca", "stranger", "extendedKeyUsage=clientAuth");
  }
  static void TearDownTestSuite() { delete pki_; }

  void SetUp() override { ASSERT_TRUE(ok_) << "openssl could not make the test certificates"; }

  // Starts a TLS server; with `require_client_certs` it verifies clients against "ca".
  void StartServer(bool require_client_certs) {
    std::vector<std::string> flags = {"--data_dir=" + MakeTempDir("tls") + "/data",
                                      "--log_level=warn", "--shared_memory_bytes=0",
                                      "--tls_cert_file=" + pki_->Path("server.pem"),
                                      "--tls_key_file=" + pki_->Path("server.key")};
    if (require_client_certs) flags.push_back("--tls_client_ca_file=" + pki_->Path("ca.pem"));
    server_ = std::make_unique<ServerProcess>(flags);
    ASSERT_TRUE(server_->Start().ok());
  }

  // CreateSequence through the client library with these TLS options.
  absl::Status CreateThroughClient(bool use_tls, const std::string& root_pem,
                                   const std::string& cert_pem, const std::string& key_pem) {
    ClientOptions options;
    options.address = server_->address();
    options.backend = BackendKind::kHost;
    options.rpc_timeout_ms = 5000;
    options.use_tls = use_tls;
    options.tls_root_certs_pem = root_pem;
    options.tls_cert_chain_pem = cert_pem;
    options.tls_private_key_pem = key_pem;
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
    if (!client.ok()) return client.status();
    absl::StatusOr<Sequence*> sequence =
        (*client)->CreateSequence("over-tls", SmallProfile(), SmallConfig(), {0, 64});
    if (!sequence.ok()) return sequence.status();
    const v1::Block block = TestBlock(kSeed, 0, 0, SmallProfile().block_key_bytes());
    absl::Status offloaded = (*sequence)->Offload(0, 0, block.key().data(), block.value().data(),
                                                  MemoryKind::kHost, nullptr);
    if (!offloaded.ok()) return offloaded;
    return (*sequence)->Flush();
  }

  static Pki* pki_;
  static bool ok_;
  std::unique_ptr<ServerProcess> server_;
};

Pki* TlsTest::pki_ = nullptr;
bool TlsTest::ok_ = false;

TEST_F(TlsTest, ClientThatTrustsTheServersCaStoresBlocks) {
  ASSERT_NO_FATAL_FAILURE(StartServer(false));
  absl::Status status = CreateThroughClient(true, pki_->Pem("ca"), "", "");
  EXPECT_TRUE(status.ok()) << status;
}

TEST_F(TlsTest, PlaintextAndUntrustingClientsAreRefused) {
  ASSERT_NO_FATAL_FAILURE(StartServer(false));
  EXPECT_EQ(CreateThroughClient(false, "", "", "").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(CreateThroughClient(true, pki_->Pem("other-ca"), "", "").code(),
            absl::StatusCode::kUnavailable);
  // A raw stub, as a plaintext grpcurl would call it: refused too.
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::ServerInfoRequest request;
  v1::ServerInfoResponse response;
  EXPECT_EQ(v1::KvStore::NewStub(channel)->GetServerInfo(&context, request, &response).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

TEST_F(TlsTest, RequiredClientCertificatesMustComeFromTheConfiguredCa) {
  ASSERT_NO_FATAL_FAILURE(StartServer(true));
  const std::string ca = pki_->Pem("ca");
  absl::Status signed_client =
      CreateThroughClient(true, ca, pki_->Pem("client"), pki_->Key("client"));
  EXPECT_TRUE(signed_client.ok()) << signed_client;
  EXPECT_EQ(CreateThroughClient(true, ca, "", "").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(CreateThroughClient(true, ca, pki_->Pem("stranger"), pki_->Key("stranger")).code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(TlsTest, HalfAClientCertificateIsInvalidArgument) {
  ClientOptions options;
  options.use_tls = true;
  options.tls_cert_chain_pem = pki_->Pem("client");
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument);
  options.tls_private_key_pem = pki_->Key("client");
  options.use_tls = false;
  client = Client::Connect(options);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(TlsTest, ServerWithACertificateButNoKeyRefusesToStart) {
  ServerProcess server({"--data_dir=" + MakeTempDir("tls-bad") + "/data", "--log_level=error",
                        "--tls_cert_file=" + pki_->Path("server.pem")});
  absl::Status started = server.Start();
  EXPECT_FALSE(started.ok());
  EXPECT_NE(started.message().find("exited during start-up"), std::string::npos) << started;
}

}  // namespace
}  // namespace kvstar::testing
