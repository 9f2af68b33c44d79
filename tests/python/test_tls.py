"""The Python package's TLS options against a real kvstar_server serving TLS, with certificates
made here by openssl: trusted CA and client certificate work, a plaintext or untrusting client
is refused with UNAVAILABLE (14)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "client" / "python"))
import kvstar  # noqa: E402
import kvstar.node  # noqa: E402

UNAVAILABLE = 14


def make_pki(directory):
    """ca.pem/.key, server.pem/.key (127.0.0.1) and client.pem/.key, in `directory`."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=kvstar-test-ca")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1"),
                            ("client", "extendedKeyUsage=clientAuth")):
        (directory / f"{name}.ext").write_text(extension + "\n")
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make test certificates")
    directory = tmp_path_factory.mktemp("pki")
    make_pki(directory)
    return directory


def node_or_skip(**kwargs):
    try:
        return kvstar.node.StorageNode(**kwargs)
    except (FileNotFoundError, OSError) as error:
        pytest.skip(str(error))


def create(client, name):
    return client.create_sequence(name, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64,
                                  max_blocks_per_layer=8)


def test_client_certificate_and_trusted_ca_pass_and_others_are_refused(pki):
    flags = [f"--tls_cert_file={pki / 'server.pem'}", f"--tls_key_file={pki / 'server.key'}",
             f"--tls_client_ca_file={pki / 'ca.pem'}", "--shared_memory_bytes=0"]
    with node_or_skip(extra_flags=flags) as node:
        ca = (pki / "ca.pem").read_text()
        with kvstar.Client(node.address, backend=kvstar.BACKEND_HOST, use_tls=True,
                           tls_root_pem=ca, tls_cert_pem=(pki / "client.pem").read_text(),
                           tls_key_pem=(pki / "client.key").read_text()) as client:
            sequence = create(client, "tls-ok")
            block = bytes(128 * 2 * 64 * 2)  # one bf16 block of K (and of V)
            sequence.offload(0, 0, block, block)
            sequence.flush()  # raises unless the server stored it
        for options in (dict(), dict(use_tls=True, tls_root_pem=ca)):
            with kvstar.Client(node.address, backend=kvstar.BACKEND_HOST, **options) as client:
                with pytest.raises(kvstar.KvstarError) as refused:
                    create(client, "tls-refused")
                assert refused.value.code == UNAVAILABLE, str(refused.value)


def test_half_a_client_certificate_is_refused_before_connecting(pki):
    with pytest.raises(kvstar.KvstarError, match="must be given together"):
        kvstar.Client("127.0.0.1:1", backend=kvstar.BACKEND_HOST, use_tls=True,
                      tls_cert_pem=(pki / "client.pem").read_text())
