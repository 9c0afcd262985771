"""Issue 21: .ci/install-servers, which .ci/run calls before the tests, installs
redis-server and PostgreSQL from the Debian packages when they are missing. Run with a
PATH of stand-ins for apt-get, sudo and id that record how they were called."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "install-servers"

APT_GET = """#!/bin/bash
echo "${SUDO:-} $DEBIAN_FRONTEND $*" >> "$LOG"
[[ -n "${APT_FAILS:-}" ]] && { echo "E: Could not open lock file" >&2; exit 100; }
if [[ "$1" == install ]]; then  # what the packages put where Debian puts it
    printf '#!/bin/bash\\n' > "$BIN/redis-server"
    /bin/mkdir -p "$PG_LIB/15/bin"
    printf '#!/bin/bash\\n' > "$PG_LIB/15/bin/initdb"
    printf '#!/bin/bash\\n' > "$PG_LIB/15/bin/pg_ctl"
    /bin/chmod +x "$BIN/redis-server" "$PG_LIB/15/bin/initdb" "$PG_LIB/15/bin/pg_ctl"
fi
"""
SUDO = """#!/bin/bash
[[ "$1" == -n ]] || { echo "sudo: a password is required" >&2; exit 1; }
shift
SUDO=sudo exec "$@"
"""


def stub(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def machine(tmp_path):
    """(run, log): run(uid, sudo=..., **env) runs the script on a machine with nothing
    installed, as user `uid`; log() is what apt-get was asked, one call a line."""
    bin_dir, pg_lib, log = tmp_path / "bin", tmp_path / "pg", tmp_path / "apt.log"
    bin_dir.mkdir()
    for tool in ("env", "dirname"):
        os.symlink(subprocess.check_output(["which", tool], text=True).strip(), bin_dir / tool)
    stub(bin_dir / "apt-get", APT_GET)

    def run(uid: int = 0, sudo: bool = False, **env: str) -> subprocess.CompletedProcess:
        stub(bin_dir / "id", f"#!/bin/bash\necho {uid}\n")
        if sudo:
            stub(bin_dir / "sudo", SUDO)
        environ = {"PATH": str(bin_dir), "PG_LIB": str(pg_lib), "LOG": str(log)}
        environ |= {"BIN": str(bin_dir), **env}
        return subprocess.run(
            ["/bin/bash", str(SCRIPT)], env=environ, capture_output=True, text=True, timeout=60
        )

    def calls() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    return run, calls, pg_lib


INSTALL = "noninteractive install -y -q --no-install-recommends redis-server postgresql"


def test_as_root_it_installs_once_then_finds_them_in_place(machine):
    run, calls, pg_lib = machine
    done = run(uid=0)
    assert done.returncode == 0, done.stderr
    assert calls() == [" noninteractive update -q", f" {INSTALL}"]
    assert done.stdout.strip() == str(pg_lib / "15" / "bin")  # for .ci/run's PATH
    again = run(uid=0)  # installed: apt-get is left alone
    assert again.returncode == 0 and len(calls()) == 2
    assert again.stdout.strip() == str(pg_lib / "15" / "bin")


def test_not_root_it_goes_through_sudo_without_a_password_prompt(machine):
    run, calls, _ = machine
    done = run(uid=1000, sudo=True)
    assert done.returncode == 0, done.stderr
    assert calls() == ["sudo noninteractive update -q", f"sudo {INSTALL}"]


@pytest.mark.parametrize(
    ("uid", "sudo", "env", "said"),
    [
        (1000, False, {}, "not root without sudo"),
        (0, False, {"APT_FAILS": "1"}, "could not install redis-server and postgresql"),
    ],
    ids=["no-sudo", "apt-fails"],
)
def test_when_it_cannot_install_it_says_so_in_one_line(machine, uid, sudo, env, said):
    run, _, _ = machine
    done = run(uid=uid, sudo=sudo, **env)
    errors = [line for line in done.stderr.splitlines() if line.startswith("ci: error:")]
    assert done.returncode == 1 and len(errors) == 1 and said in errors[0], done.stderr
    assert "redis-server" in errors[0]
