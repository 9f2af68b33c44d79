# Included by deploy/build-tsan-grpc.sh (CMAKE_PROJECT_INCLUDE) into Debian's gRPC 1.51.1 build:
# a unity build (CMAKE_UNITY_BUILD, batches of 16) compiles 68 C++ translation units instead of
# 527, which is what makes the -fsanitize=thread build fit CI's two cores. The sources below
# define file-local names (statics, anonymous-namespace constants and functions, vtables, each
# grpc++ file's g_gli_initializer) that another source of the same batch defines too, so each is
# compiled alone (found by building: gcc's "redefinition of" errors). C sources (upb and its
# generated tables, which all define a static `messages_layout`) are quick and compiled alone too.
file(GLOB_RECURSE _kvstar_alone RELATIVE "${CMAKE_CURRENT_SOURCE_DIR}"
     "${CMAKE_CURRENT_SOURCE_DIR}/src/*.c" "${CMAKE_CURRENT_SOURCE_DIR}/third_party/*.c"
     "${CMAKE_CURRENT_SOURCE_DIR}/src/core/tsi/alts/frame_protector/*.cc"
     "${CMAKE_CURRENT_SOURCE_DIR}/src/core/tsi/alts/zero_copy_frame_protector/*.cc")
list(APPEND _kvstar_alone
  src/core/ext/filters/client_channel/lb_policy/weighted_target/weighted_target.cc
  src/core/ext/transport/chttp2/transport/bin_encoder.cc
  src/core/ext/xds/xds_channel_stack_modifier.cc
  src/core/lib/event_engine/posix_engine/ev_poll_posix.cc
  src/core/lib/iomgr/ev_poll_posix.cc
  src/core/lib/iomgr/ev_posix.cc
  src/core/lib/security/credentials/alts/grpc_alts_credentials_server_options.cc
  src/core/lib/security/credentials/external/external_account_credentials.cc
  src/core/tsi/alts/handshaker/alts_handshaker_client.cc
  src/core/tsi/fake_transport_security.cc
  src/core/tsi/local_transport_security.cc
  src/core/tsi/ssl_transport_security.cc
  src/cpp/client/channel_cc.cc
  src/cpp/client/client_context.cc
  src/cpp/client/credentials_cc.cc
  src/cpp/client/secure_credentials.cc
  src/cpp/common/alarm.cc
  src/cpp/common/completion_queue_cc.cc
  src/cpp/common/tls_certificate_verifier.cc
  src/cpp/server/server_cc.cc
  src/cpp/server/server_context.cc
  src/cpp/server/server_credentials.cc
  src/cpp/util/byte_buffer_cc.cc
)
set_source_files_properties(${_kvstar_alone} PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)
