"""Fetch transcript pages from the public script site, politely and resumably.

Episode links are read from the site's index page; each page's text (what a browser
shows, one block per line) is saved as NAME.txt, the layout `prepare` reads.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

from sitcom.files import write_atomic

DEFAULT_BASE_URL = "https://www.seinfeldscripts.com"
DEFAULT_INDEX = "seinfeld-scripts.html"
USER_AGENT = "sitcom-bot-corpus/0.1 (+https://github.com; polite, one request at a time)"
TIMEOUT_S = 30


class DownloadError(Exception):
    """The index could not be fetched or nothing was found: exit code 2."""


class _TextAndLinks(HTMLParser):
    """Page text with a line break per block element, and every <a href>."""

    BLOCKS = {
        "p",
        "br",
        "div",
        "tr",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "title",
        "table",
        "ul",
        "ol",
        "dd",
        "dt",
        "pre",
        "blockquote",
        "hr",
    }
    SKIP = {"script", "style", "noscript"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.links: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self._skip += 1
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self._skip:
            self._skip -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)

    def text(self) -> str:
        return "".join(self.parts)


def html_to_text(html: str) -> str:
    parser = _TextAndLinks()
    parser.feed(html)
    return parser.text()


def episode_links(index_html: str, index_url: str) -> list[str]:
    """Absolute URLs of the pages the index links to on the same site (in order, once each)."""
    parser = _TextAndLinks()
    parser.feed(index_html)
    host = urllib.parse.urlsplit(index_url).netloc
    seen: dict[str, None] = {}
    for href in parser.links:
        url = urllib.parse.urljoin(index_url, href.strip()).split("#")[0]
        parts = urllib.parse.urlsplit(url)
        if parts.netloc == host and parts.path.endswith((".htm", ".html")) and url != index_url:
            seen.setdefault(url, None)
    return list(seen)


def _fetch(url: str) -> str:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        raw = response.read()
        charset = response.headers.get_content_charset() or "utf-8"
    try:
        return raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return raw.decode("cp1252", errors="replace")


def download(
    out_dir: Path, base_url: str = DEFAULT_BASE_URL, index: str = DEFAULT_INDEX, delay: float = 1.0
) -> str:
    """Fetch every linked page not already in out_dir; returns a one-line report."""
    if delay < 0:
        raise DownloadError(f"delay must be >= 0, got {delay}")
    index_url = urllib.parse.urljoin(base_url.rstrip("/") + "/", index)
    try:
        links = episode_links(_fetch(index_url), index_url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DownloadError(f"cannot fetch index {index_url}: {exc}") from exc
    if not links:
        raise DownloadError(f"no transcript links found on {index_url}")
    out_dir.mkdir(parents=True, exist_ok=True)
    fetched, skipped, failed = 0, 0, []
    for url in links:
        stem = Path(urllib.parse.urlsplit(url).path).stem
        target = out_dir / f"{stem}.txt"
        if target.is_symlink() and not target.exists():
            # Saving would replace the link itself: leave whatever it was meant for alone.
            failed.append(
                f"{url} ({target}: a symbolic link to nothing, not a regular file; left alone)"
            )
            continue
        if target.exists():
            skipped += 1  # resume: a page already saved is never fetched twice
            continue
        time.sleep(delay)  # be polite: one request at a time, spaced out
        try:
            write_atomic(target, html_to_text(_fetch(url)))
            fetched += 1
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failed.append(f"{url} ({exc})")
    report = f"{fetched} fetched, {skipped} already present, {len(failed)} failed -> {out_dir}"
    if failed:
        report += "\nfailed: " + "; ".join(failed)
    return report
