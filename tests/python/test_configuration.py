"""Every kvstar_server flag is documented in docs/configuration.md and set in the configuration
file deploy/kvstar.flags, to its compiled default; nothing documented is missing from the server;
the README's flags exist; and the server starts from the file."""
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "kvstar.flags"


def defined_flags():
    flags = set()
    for source in (REPO / "server").glob("*.cc"):
        flags |= set(re.findall(r"ABSL_FLAG\(\s*[^,]+,\s*(\w+)\s*,", source.read_text()))
    assert flags, "no ABSL_FLAG found under server/"
    return flags


def file_values():
    values = {}
    for line in CONFIG.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.removeprefix("--")] = value
    return values


def test_configuration_page_documents_exactly_the_servers_flags():
    documented = set(re.findall(r"^\| `--(\w+)` \|", (REPO / "docs" / "configuration.md")
                                .read_text(), re.M))
    assert defined_flags() - documented == set(), "flags missing from docs/configuration.md"
    assert documented - defined_flags() == set(), "docs/configuration.md names unknown flags"


def test_readme_names_only_existing_flags():
    named = set(re.findall(r"`--(\w+)`", (REPO / "README.md").read_text()))
    assert named - defined_flags() == set()


def help_defaults(server):
    """{flag: default} as the built server prints them in --helpfull."""
    text = subprocess.run([server, "--helpfull"], capture_output=True, text=True).stdout
    defaults = {}
    for entry in re.split(r"\n(?=    --)", text):  # one entry per flag, wrapped over lines
        match = re.match(r"\s*--(\w+) .*?;\s+default: (.*?);(?:\s|$)", entry, re.S)
        if match:
            defaults[match.group(1)] = match.group(2).strip('"')
    return defaults


def server_or_skip():
    import sys
    sys.path.insert(0, str(REPO / "client" / "python"))
    import kvstar.node
    try:
        return kvstar.node.find_server()
    except FileNotFoundError as error:
        pytest.skip(str(error))


def test_configuration_file_sets_every_flag_to_its_default():
    values = file_values()
    assert set(values) == defined_flags()
    defaults = help_defaults(server_or_skip())
    missing = defined_flags() - set(defaults)
    assert not missing, f"--helpfull did not print defaults of {missing}"
    differing = {name: (values[name], defaults[name]) for name in values
                 if values[name] != defaults[name]}
    assert differing == {}, "file value != compiled default"


def test_server_starts_from_the_configuration_file():
    server = server_or_skip()
    with tempfile.TemporaryDirectory() as directory:
        port_file = os.path.join(directory, "port")
        process = subprocess.Popen(
            [server, f"--flagfile={CONFIG}", "--listen=127.0.0.1:0", f"--port_file={port_file}",
             f"--data_dir={directory}/data", "--shared_memory_bytes=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(port_file):
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "no port within 60 s"
                time.sleep(0.05)
            assert int(Path(port_file).read_text()) > 0
        finally:
            process.terminate()
            assert process.wait(timeout=30) == 0
