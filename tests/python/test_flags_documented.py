"""Every kvstar_server flag is in the README's flag table, and every flag there exists."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_flag_table_matches_the_servers_flags():
    defined = set()
    for source in (REPO / "server").glob("*.cc"):
        defined |= set(re.findall(r"ABSL_FLAG\(\s*[^,]+,\s*(\w+)\s*,", source.read_text()))
    documented = set(re.findall(r"^\| `--(\w+)` \|", (REPO / "README.md").read_text(), re.M))
    assert defined, "no ABSL_FLAG found under server/"
    assert defined - documented == set(), "flags missing from README's table"
    assert documented - defined == set(), "README documents flags the server lacks"
