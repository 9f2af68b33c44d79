// MakeServerCredentials: which flag combinations serve TLS, and errors that name the flag.
#include "server/tls.h"

#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace kvstar::server {
namespace {

std::string TempFile(const std::string& name, const std::string& text) {
  const char* root = std::getenv("TEST_TMPDIR");
  std::string path = std::string(root != nullptr ? root : "/tmp") + "/" + name;
  std::ofstream(path) << text;
  return path;
}

constexpr char kCert[] = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
constexpr char kKey[] = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";

TEST(ServerTlsTest, NoFilesMeansPlaintext) { EXPECT_TRUE(MakeServerCredentials({}).ok()); }

TEST(ServerTlsTest, ErrorsNameTheFlag) {
  const std::string cert = TempFile("cert.pem", kCert);
  const std::string key = TempFile("key.pem", kKey);
  struct Case {
    TlsFiles files;
    std::string message;
  } cases[] = {
      {{cert, "", ""}, "--tls_cert_file and --tls_key_file must be given together"},
      {{"", key, ""}, "--tls_cert_file and --tls_key_file must be given together"},
      {{"", "", cert}, "--tls_client_ca_file needs"},
      {{cert + ".missing", key, ""}, "--tls_cert_file " + cert + ".missing: cannot read it"},
      {{TempFile("empty.pem", ""), key, ""}, "is empty"},
      {{key, key, ""}, "--tls_cert_file " + key + " holds no PEM \"CERTIFICATE\" block"},
      {{cert, cert, ""}, "--tls_key_file " + cert + " holds no PEM \"PRIVATE KEY\" block"},
      {{cert, key, key}, "--tls_client_ca_file " + key + " holds no PEM"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> made = MakeServerCredentials(c.files);
    ASSERT_FALSE(made.ok()) << c.message;
    EXPECT_EQ(made.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(made.status().message().find(c.message), std::string::npos) << made.status();
  }
}

TEST(ServerTlsTest, CertificateAndKeyMakeTlsCredentials) {
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> made = MakeServerCredentials(
      {TempFile("c.pem", kCert), TempFile("k.pem", kKey), TempFile("ca.pem", kCert)});
  ASSERT_TRUE(made.ok()) << made.status();
  EXPECT_NE(made->get(), nullptr);
}

}  // namespace
}  // namespace kvstar::server
