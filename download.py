"""
One file over HTTP(S), safely: resumable, stall-proof, never an HTML page kept as weights, Google Drive's
"can't scan for viruses" page passed. Standard library only; fetch.py says WHAT to download, this says HOW.

- dest is written as dest.part; dest.part.json (the sidecar) records what the part is a part of: the URL, the
  expected size and the server's validator (ETag / Last-Modified). A rerun resumes a part only when the sidecar
  matches (Range + If-Range); a part of anything else is discarded with a line saying so.
- A download slower than `min_rate` bytes/s over `window` seconds (a drip-feeding or silent server) ends with one
  line; the part is kept for the rerun.
- A 200 response that is HTML (Content-Type text/html, or a body starting with "<": no checkpoint, JSON or
  SentencePiece file does) is never saved. On Drive it is the confirm page: its form (or confirm= link) is
  followed, with Drive's cookies; anything else (quota exceeded, login) is one error line.
- dest appears only after `verify(dest.part)` accepted the content (fetch.py checks keys and shapes).
"""
import http.client
import http.cookiejar
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser

CHUNK = 1 << 20       # bytes per read (at most)
MIN_RATE = 10_000     # bytes/s; slower than this over WINDOW seconds is a stall
WINDOW = 60.0         # seconds
DRIVE = "https://drive.google.com/uc?export=download&id="


class FetchError(Exception):
    """A download failed; the message is one line naming the URL or file."""


def say(msg, end="\n"):
    sys.stderr.write(msg + end)
    sys.stderr.flush()


def mb(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


class Progress:
    """One updating line on a terminal; a plain line every few seconds (and at the end) otherwise."""

    def __init__(self, name, done, total):
        self.name, self.done, self.total, self.start_bytes = name, done, total, done
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, n):
        self.done += n
        now = time.time()
        if now - self.last >= (0.2 if self.tty else 5.0):
            self.last = now
            self.show()

    def show(self, final=False):
        speed = (self.done - self.start_bytes) / max(time.time() - self.t0, 1e-6) / 1e6
        pct = f" {100 * self.done / self.total:3.0f}%" if self.total else ""
        of = f"/{mb(self.total)}" if self.total else ""
        line = f"  {self.name}: {mb(self.done)}{of}{pct}  {speed:.1f} MB/s"
        say("\r" + line.ljust(70), end="\n" if final else "") if self.tty else say(line)


def with_base(url, base):
    """Swap scheme://host for `base`, keeping path and query: https://h/a?b -> BASE/a?b."""
    if not base:
        return url
    u = urllib.parse.urlsplit(url)
    return base.rstrip("/") + u.path + (f"?{u.query}" if u.query else "")


def check_base(base):
    u = urllib.parse.urlsplit(base)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise FetchError(f"--base-url {base}: not an http(s) URL (e.g. http://127.0.0.1:8000)")


def total_from_range(value):
    """'bytes 100-999/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); else (None, None)."""
    import re
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


class ConfirmPage(HTMLParser):
    """Drive's interstitial: <form action=...> with hidden inputs (id, export, confirm, uuid), or an older
    <a href="...confirm=TOKEN...">; also the <title> for error messages."""

    def __init__(self):
        super().__init__()
        self.action, self.inputs, self.link, self.title, self._in_title = None, {}, None, "", False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and self.action is None:
            self.action = a.get("action")
        elif tag == "input" and self.action is not None and a.get("name"):
            self.inputs[a["name"]] = a.get("value") or ""
        elif tag == "a" and "confirm=" in (a.get("href") or "") and self.link is None:
            self.link = a["href"]
        self._in_title = tag == "title"

    def handle_data(self, data):
        if self._in_title:
            self.title += data.strip()

    def next_url(self, page_url):
        if self.action and "id" in self.inputs:
            self.inputs.setdefault("confirm", "t")
            return urllib.parse.urljoin(page_url, self.action) + "?" + urllib.parse.urlencode(self.inputs)
        if self.link:
            return urllib.parse.urljoin(page_url, self.link)
        return None


OPENER = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def open_url(url, start=0, validator=None, timeout=WINDOW):
    headers = {"User-Agent": "minigpt4-fetch/1.0"}
    if start:
        headers["Range"] = f"bytes={start}-"
        if validator:
            headers["If-Range"] = validator  # the server sends the whole file (200) if it changed
    return OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout)


def read_sidecar(path):
    try:
        with open(path) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def discard(part, why):
    say(f"  discarding {part}: {why}")
    for p in (part, part + ".json"):
        if os.path.exists(p):
            os.remove(p)


def download(url, dest, verify=None, optional=False, base=None, min_rate=MIN_RATE, window=WINDOW):
    """url -> dest (via a verified dest.part). False if optional and 404; FetchError on any failure.
    `url` is the canonical address (recorded in the sidecar); `base` swaps its host (mirrors, tests)."""
    name = os.path.basename(dest)
    if os.path.isfile(dest):
        if verify:
            try:
                verify(dest)
            except FetchError as e:
                raise FetchError(f"{dest} is there but is not the expected file ({e}): delete it and run again") from None
        say(f"  {name}: already there{', verified' if verify else ''}, skipped")
        return True
    part, side = dest + ".part", dest + ".part.json"
    meta = read_sidecar(side) if os.path.isfile(part) else None
    if os.path.isfile(part) and (meta is None or meta.get("url") != url):
        discard(part, f"not a part of {url}" + ("" if meta else " (no sidecar)"))
        meta = None
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    validator = meta and (meta.get("etag") or meta.get("last_modified"))
    target = with_base(url, base)
    for hop in range(4):  # Drive: page -> confirm -> file; a changed file restarts once
        resp = request(target, have, validator, window, optional, name)
        if isinstance(resp, tuple):  # 416: the part may already be the whole file (verify says)
            if have in (resp[1], meta and meta.get("size")):
                return finish(target, part, dest, verify, have)
            discard(part, f"the server has nothing after byte {have} and the size does not match")
            have, validator = 0, None
            continue
        if resp is False:
            return False
        with resp:
            try:
                first = b"" if resp.status == 206 else resp.read1(CHUNK)
            except (http.client.HTTPException, OSError) as e:  # includes the socket timeout
                raise FetchError(f"{target}: no data ({type(e).__name__}); run again") from None
            ctype = resp.headers.get("Content-Type", "")
            if ctype.startswith("text/html") or first.lstrip()[:1] == b"<":
                page = ConfirmPage()
                page.feed((first + resp.read(1 << 21)).decode("utf-8", "replace"))
                nxt = page.next_url(resp.geturl())
                if nxt is None or hop == 3:
                    raise FetchError(f"{target}: the server sent an HTML page ({page.title or 'no title'!r}), not the "
                                     f"file; on Google Drive: quota exceeded or no access, try later or save it "
                                     f"from a browser as {dest}")
                target = with_base(nxt, base)
                continue
            length = resp.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
            if resp.status == 206:
                start, total = total_from_range(resp.headers.get("Content-Range"))
                if total is None and length is not None:
                    total = have + length
                if start != have or (meta and meta.get("size") not in (None, total)) or \
                        (meta and meta.get("etag") and etag and meta["etag"] != etag):
                    discard(part, "the server's file is not the one this part was started from")
                    have, validator, meta = 0, None, None
                    continue
                say(f"  {name}: resuming at {mb(have)}")
                mode = "ab"
            else:  # 200: the whole file (a server that ignores Range, or a changed file, also lands here)
                if have:
                    say(f"  {name}: the server sent the whole file, starting over")
                have, mode, total = 0, "wb", length
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            with open(side, "w") as f:
                json.dump(dict(url=url, size=total, etag=etag, last_modified=modified), f)
            lost = stream(resp, part, mode, first, Progress(name, have, total), min_rate, window, target)
        size = os.path.getsize(part)
        if lost or (total is not None and size != total):
            why = lost or "size mismatch"
            raise FetchError(f"{target}: {why}: got {size} of {total if total is not None else '?'} bytes; "
                             f"kept {part}, run again to resume")
        return finish(target, part, dest, verify, size)
    raise FetchError(f"{target}: too many redirections through pages")


def request(url, have, validator, window, optional, name):
    """The response; (416, the file's size) when nothing follows `have`; False for an optional 404."""
    try:
        return open_url(url, have, validator, timeout=window)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return 416, total_from_range(e.headers.get("Content-Range"))[1]
        if e.code == 404 and optional:
            say(f"  {name}: not on the server (404), skipped: optional")
            return False
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise FetchError(f"{url}: cannot connect ({e.reason})") from None
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise FetchError(f"{url}: {type(e).__name__}: {e}") from None


def stream(resp, part, mode, first, prog, min_rate, window, url):
    """Body -> part; None when the server closed normally, else why it stopped (the part keeps what came)."""
    lost = None
    mark_t, mark_n = time.time(), 0  # a tumbling window: bytes since mark_t
    try:
        with open(part, mode) as f:
            chunk = first
            while True:
                if chunk:
                    f.write(chunk)
                    prog.update(len(chunk))
                    mark_n += len(chunk)
                now = time.time()
                if now - mark_t >= window:
                    if mark_n / (now - mark_t) < min_rate:
                        lost = f"stalled (under {mb(min_rate)}/s for {now - mark_t:.0f} s)"
                        break
                    mark_t, mark_n = now, 0
                try:
                    chunk = resp.read1(CHUNK)
                except (socket.timeout, TimeoutError):
                    lost = f"stalled (no data for {window:.0f} s)"
                    break
                except (http.client.HTTPException, OSError) as e:  # closed early, reset
                    lost = f"connection lost ({type(e).__name__})"
                    break
                if not chunk:
                    break
    except OSError as e:
        raise FetchError(f"{url}: cannot write {part}: {e.strerror or e}") from None
    prog.done = os.path.getsize(part)
    prog.show(final=True)
    return lost


def finish(url, part, dest, verify, size):
    """part -> dest once its content is verified; a part that fails is deleted (it can never become right)."""
    if verify:
        try:
            verify(part)
        except FetchError as e:
            discard(part, "failed verification")
            raise FetchError(f"{url}: the downloaded file is not the expected one ({e}); deleted it, run again") from None
    os.replace(part, dest)  # atomic: dest exists only when complete and verified
    if os.path.exists(part + ".json"):
        os.remove(part + ".json")
    say(f"  {os.path.basename(dest)}: complete ({mb(size)}{', verified' if verify else ''})")
    return True
