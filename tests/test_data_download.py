"""`python -m data download` against a local HTTP server serving fixture pages."""

import functools
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data.download import DownloadError, download, html_to_text

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "tests" / "fixtures" / "data" / "site"


class _Handler(SimpleHTTPRequestHandler):
    requests: list[tuple[str, str]] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests.append((self.path, self.headers.get("User-Agent", "")))
        super().do_GET()

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def site():
    _Handler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=SITE))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_fetches_linked_pages_as_text(tmp_path, site):
    report = download(tmp_path, base_url=site, delay=0)
    assert report.startswith("2 fetched, 0 already present, 0 failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TheFakeOne.txt", "TheFakeTwo.txt"]
    lines = [ln.strip() for ln in (tmp_path / "TheFakeOne.txt").read_text().splitlines()]
    assert "JERRY: Hello, Newman." in lines and "[Scene: Monk's]" in lines
    assert "Jerry." in lines and not any("ads" in ln for ln in lines)
    assert all(agent.startswith("sitcom-bot") for _, agent in _Handler.requests)


def test_download_resumes_without_refetching(tmp_path, site):
    (tmp_path / "TheFakeOne.txt").write_text("already here")
    report = download(tmp_path, base_url=site, delay=0)
    assert report.startswith("1 fetched, 1 already present")
    assert (tmp_path / "TheFakeOne.txt").read_text() == "already here"
    assert [p for p, _ in _Handler.requests] == ["/seinfeld-scripts.html", "/TheFakeTwo.html"]


@pytest.mark.e2e
def test_missing_index_is_a_clear_error(tmp_path, site):
    with pytest.raises(DownloadError, match="cannot fetch index"):
        download(tmp_path, base_url=site, index="nope.html", delay=0)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data",
            "download",
            str(tmp_path / "o"),
            "--base-url",
            site,
            "--index",
            "nope.html",
            "--delay",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: cannot fetch index")
    assert "Traceback" not in result.stderr


def test_html_to_text_puts_blocks_on_lines():
    text = html_to_text("<p>A: one</p><p>B: two<br>three</p><script>x()</script>")
    assert [ln for ln in text.splitlines() if ln] == ["A: one", "B: two", "three"]
