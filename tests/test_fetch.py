"""fetch.py / download.py against a local HTTP server laid out like the real hosts (never the internet): a
storage bucket, a Hugging Face repo and Google Drive's confirm flow (interstitial page -> form -> redirect ->
file). Resume with Range and a sidecar, content verification, and each way a download can go wrong."""
import http.server
import json
import shutil
import socket
import threading
import time
import urllib.parse

import pytest
import torch

import download
import fetch
from conftest import FIXTURES
from llama import Llama
from model import URLS, MiniGPT4, MiniGPT4Config, find_weights

TINY = FIXTURES / "reference" / "tiny"
BLIP2 = "sfr-vision-language-research/LAVIS/models/BLIP2"
HF = "Vision-CAIR/vicuna-7b/resolve/main"
VIT = f"{BLIP2}/eva_vit_g.pth"
PROJ_ID = fetch.DRIVE_IDS["vicuna-7b"]
PROJ = "prerained_minigpt4_7b.pth"  # the release's name (sic)
CONFIRM_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="https://drive.usercontent.google.com/download" method="get">
<input type="submit" id="uc-download-link" value="Download anyway"/><input type="hidden" name="id" value="{id}">
<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="1b2c3d"></form></body></html>"""
QUOTA_PAGE = "<html><head><title>Google Drive - Quota exceeded</title></head><body>Too many users</body></html>"


class Server:
    """Serves files under `root` with Range support (206 + Content-Range, 416), and Drive's flow: /uc?id= -> the
    confirm page (sets a cookie) -> /download?id=&confirm=t (needs it) -> 302 -> /files/ID. Knobs to misbehave."""

    def __init__(self, root):
        self.root, self.log = root, []  # log: (path, Range header or None) per GET
        self.ignore_range, self.extra_length, self.cut, self.no_length = False, 0, None, False
        self.drip, self.html, self.quota, self.etag = None, set(), False, '"v1"'
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def page(self, code, text, **headers):
                body = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k.replace("_", "-"), v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                path, query = urllib.parse.unquote(url.path), dict(urllib.parse.parse_qsl(url.query))
                rng = self.headers.get("Range")
                srv.log.append((path, rng))
                if path == "/uc":  # drive.google.com/uc?export=download&id=ID
                    if srv.quota:
                        return self.page(200, QUOTA_PAGE)
                    return self.page(200, CONFIRM_PAGE.format(id=query["id"]), Set_Cookie="download_warning=ok")
                if path == "/download":  # drive.usercontent.google.com/download?id=&export=&confirm=t&uuid=
                    if query.get("confirm") != "t" or "download_warning=ok" not in self.headers.get("Cookie", ""):
                        return self.page(200, CONFIRM_PAGE.format(id=query.get("id")))
                    self.send_response(302)
                    self.send_header("Location", f"/files/{query['id']}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if path in srv.html:  # an error page where the file should be
                    return self.page(200, "<html><head><title>Sign in</title></head></html>")
                file = srv.root / path.lstrip("/")
                if not file.is_file():
                    return self.send_error(404)
                data = file.read_bytes()
                if rng and not srv.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    body = data[start:]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("ETag", srv.etag)
                if not srv.no_length:
                    self.send_header("Content-Length", str(len(body) + srv.extra_length))  # extra_length: a lie
                self.end_headers()
                if srv.drip:  # one byte at a time, slowly
                    try:
                        for b in body[:20]:
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            time.sleep(srv.drip)
                    except OSError:  # the client gave up: what the test wants
                        pass
                    return
                self.wfile.write(body[:srv.cut])  # cut: the connection closes early

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def tiny_shapes(monkeypatch):
    """The server holds the tiny fixture under the real names: verify against the tiny preset's shapes."""
    from llama import LlamaConfig
    monkeypatch.setattr(fetch, "expected", lambda preset: (MiniGPT4Config.from_name("tiny"), LlamaConfig.from_name("tiny")))


@pytest.fixture(scope="module")
def site_src(tmp_path_factory):
    """The fixture files where the real hosts keep them; the tiny LLM split into 2 shards + index."""
    root = tmp_path_factory.mktemp("site")
    (root / BLIP2).mkdir(parents=True)
    shutil.copy(TINY / "eva_vit_g.pth", root / VIT)
    shutil.copy(TINY / "blip2_pretrained.pth", root / BLIP2 / "blip2_pretrained_flant5xxl.pth")
    hf = root / HF
    hf.mkdir(parents=True)
    for name in fetch.LLM_FILES + fetch.OPTIONAL:
        shutil.copy(TINY / "llama" / name, hf / name)
    sd = torch.load(TINY / "llama" / "pytorch_model.bin", weights_only=True)
    keys, weight_map = list(sd), {}
    for i, chunk in enumerate([keys[:len(keys) // 2], keys[len(keys) // 2:]]):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in chunk}, hf / name)
        weight_map.update({k: name for k in chunk})
    (hf / fetch.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "files").mkdir()
    shutil.copy(TINY / "minigpt4_proj.pth", root / "files" / PROJ_ID)
    return root


@pytest.fixture
def server(site_src, tmp_path):
    root = tmp_path / "site"
    shutil.copytree(site_src, root)
    srv = Server(root)
    yield srv
    srv.close()


def expected_files(root):
    """{path in the weights folder: path on the server}."""
    qformer = "blip2_pretrained_flant5xxl.pth"
    out = {"eva_vit_g.pth": root / VIT, qformer: root / BLIP2 / qformer, PROJ: root / "files" / PROJ_ID}
    out.update({f"vicuna-7b/{p.name}": p for p in (root / HF).iterdir()})
    return out


def run(srv, out, *extra, model="vicuna-7b"):
    return fetch.main(["--model", model, "--out", str(out), "--base-url", srv.url, *extra])


def error_lines(err):
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def part_of(out, name, url, data, size=None, etag='"v1"'):
    """A .part left by an earlier run: its bytes and the sidecar naming what it is a part of."""
    out.mkdir(exist_ok=True)
    (out / f"{name}.part").write_bytes(data)
    (out / f"{name}.part.json").write_text(json.dumps(dict(url=url, size=size, etag=etag, last_modified=None)))


def test_full_fetch_builds_a_loadable_folder(server, tmp_path, capsys):
    out = tmp_path / "weights"
    assert run(server, out) == 0
    err = capsys.readouterr().err
    files = expected_files(server.root)
    assert len(files) == 11  # vit, qformer, proj, index, 2 shards, config, tokenizer, 3 optional files
    for rel, src in files.items():
        assert (out / rel).read_bytes() == src.read_bytes(), rel
    assert not list(out.rglob("*.part*"))
    assert all(rng is None for _, rng in server.log)  # nothing to resume
    drive = [p for p, _ in server.log if p in ("/uc", "/download") or p.startswith("/files/")]
    assert drive == ["/uc", "/download", f"/files/{PROJ_ID}"]  # interstitial, confirm (+cookie), redirect
    assert "100%" in err and "MB/s" in err and "verified" in err
    assert "all weights in place" in err
    ours, ref = Llama.from_pretrained(out / "vicuna-7b"), Llama.from_pretrained(TINY / "llama")
    for (k, a), (k2, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    shutil.copy(TINY / "config.json", out / "config.json")  # the fixture dims (a release folder has none)
    paths = find_weights(str(out), "vicuna-7b")
    assert paths["llm"] == str(out / "vicuna-7b") and paths["proj"] == str(out / PROJ)
    model = MiniGPT4.from_pretrained(str(out), "vicuna-7b")
    assert torch.equal(model.llama_proj.weight, torch.load(TINY / "minigpt4_proj.pth")["model"]["llama_proj.weight"])


def test_complete_files_are_skipped_without_a_request(server, tmp_path, capsys):
    out = tmp_path / "weights"
    assert run(server, out) == 0
    server.log.clear()
    capsys.readouterr()
    assert run(server, out) == 0
    assert server.log == []
    assert "already there, verified" in capsys.readouterr().err


def test_resume_sends_range_and_appends(server, tmp_path, capsys):
    out, data = tmp_path / "weights", (server.root / VIT).read_bytes()
    part_of(out, "eva_vit_g.pth", URLS["vit"], data[:1000], len(data))
    assert run(server, out, "--only", "vit") == 0
    assert server.log == [("/" + VIT, "bytes=1000-")]
    assert (out / "eva_vit_g.pth").read_bytes() == data
    assert not (out / "eva_vit_g.pth.part").exists() and not (out / "eva_vit_g.pth.part.json").exists()
    assert "resuming" in capsys.readouterr().err


@pytest.mark.parametrize("sidecar", ["none", "other_url", "other_etag", "other_size"])
def test_foreign_part_is_discarded_not_resumed(server, tmp_path, capsys, sidecar):
    out, data = tmp_path / "weights", (server.root / VIT).read_bytes()
    junk = (server.root / BLIP2 / "blip2_pretrained_flant5xxl.pth").read_bytes()[:1000]  # another file's start
    if sidecar == "none":
        out.mkdir()
        (out / "eva_vit_g.pth.part").write_bytes(junk)
    else:
        part_of(out, "eva_vit_g.pth", URLS["qformer"] if sidecar == "other_url" else URLS["vit"], junk,
                len(data) + (sidecar == "other_size"), '"v0"' if sidecar == "other_etag" else '"v1"')
    assert run(server, out, "--only", "vit") == 0
    assert "discarding" in capsys.readouterr().err
    assert (out / "eva_vit_g.pth").read_bytes() == data
    assert server.log[-1] == ("/" + VIT, None)  # the last request started over


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, capsys):
    out, data = tmp_path / "weights", (server.root / VIT).read_bytes()
    part_of(out, "eva_vit_g.pth", URLS["vit"], b"\0" * 1000, len(data))  # wrong bytes: must not survive
    server.ignore_range = True
    assert run(server, out, "--only", "vit") == 0
    assert server.log == [("/" + VIT, "bytes=1000-")]
    assert (out / "eva_vit_g.pth").read_bytes() == data
    assert "whole file, starting over" in capsys.readouterr().err


def test_416_part_already_complete_is_verified(server, tmp_path, capsys):
    out, data = tmp_path / "weights", (server.root / VIT).read_bytes()
    part_of(out, "eva_vit_g.pth", URLS["vit"], data, len(data))
    assert run(server, out, "--only", "vit") == 0
    assert server.log == [("/" + VIT, f"bytes={len(data)}-")]
    assert (out / "eva_vit_g.pth").read_bytes() == data


@pytest.mark.parametrize("how", ["closes_early", "lies_in_content_length"])
def test_size_mismatch_keeps_part_and_no_final_file(server, tmp_path, capsys, how):
    out, data = tmp_path / "weights", (server.root / VIT).read_bytes()
    server.cut, server.extra_length = (5000, 0) if how == "closes_early" else (None, 100)
    assert run(server, out, "--only", "vit") == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and server.url + "/" + VIT in errors[0] and "run again to resume" in errors[0]
    assert not (out / "eva_vit_g.pth").exists()
    kept = (out / "eva_vit_g.pth.part").read_bytes()
    assert kept == data[:len(kept)]
    server.cut, server.extra_length = None, 0  # a well-behaved server again: the rerun resumes
    assert run(server, out, "--only", "vit") == 0
    assert server.log[-1] == ("/" + VIT, f"bytes={len(kept)}-")
    assert (out / "eva_vit_g.pth").read_bytes() == data


def test_drive_mid_file_disconnect_resumes_through_the_confirm_page(server, tmp_path, capsys):
    out, data = tmp_path / "weights", (server.root / "files" / PROJ_ID).read_bytes()
    server.cut = 300
    assert run(server, out, "--only", "proj") == 1
    assert "run again to resume" in error_lines(capsys.readouterr().err)[0]
    assert (out / f"{PROJ}.part").read_bytes() == data[:300]
    server.cut = None
    server.log.clear()
    assert run(server, out, "--only", "proj") == 0
    assert server.log[-1] == (f"/files/{PROJ_ID}", "bytes=300-")
    assert (out / PROJ).read_bytes() == data


def test_no_content_length_cut_short_is_never_complete(server, tmp_path, capsys):
    out, data = tmp_path / "weights", (server.root / VIT).read_bytes()
    server.no_length, server.cut = True, len(data) // 2  # the server closes cleanly, saying nothing about size
    assert run(server, out, "--only", "vit") == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "not the expected one" in errors[0]
    assert not (out / "eva_vit_g.pth").exists() and not (out / "eva_vit_g.pth.part").exists()
    server.cut = None  # still no Content-Length, but the whole file: verified by content, so complete
    assert run(server, out, "--only", "vit") == 0
    assert (out / "eva_vit_g.pth").read_bytes() == data


def test_corrupt_download_is_caught_by_verification(server, tmp_path, capsys):
    out = tmp_path / "weights"
    blob = bytearray((server.root / "files" / PROJ_ID).read_bytes())
    blob[len(blob) // 2:] = bytes(len(blob) - len(blob) // 2)  # same size, zeros in the second half
    (server.root / "files" / PROJ_ID).write_bytes(blob)
    assert run(server, out, "--only", "proj") == 1
    assert "not the expected one" in error_lines(capsys.readouterr().err)[0]
    assert not list(out.iterdir())


def test_wrong_checkpoint_is_caught_by_its_keys(server, tmp_path, capsys):
    shutil.copy(server.root / VIT, server.root / "files" / PROJ_ID)  # a ViT where the projection should be
    assert run(server, tmp_path / "weights", "--only", "proj") == 1
    assert "key set" in error_lines(capsys.readouterr().err)[0]


@pytest.mark.parametrize("where", ["hub", "drive_quota"])
def test_html_page_is_never_saved_as_weights(server, tmp_path, capsys, where):
    out = tmp_path / "weights"
    if where == "hub":
        server.html.add("/" + VIT)
    server.quota = where == "drive_quota"
    assert run(server, out, "--only", "vit" if where == "hub" else "proj") == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "HTML page" in errors[0]
    assert ("Sign in" if where == "hub" else "Quota exceeded") in errors[0]
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("drip", [0.05, 3.0])  # 20 bytes/s; one byte, then silence (the socket timeout)
def test_drip_feeding_server_stalls_with_one_line(server, tmp_path, capsys, drip):
    server.drip = drip
    t0 = time.time()
    assert run(server, tmp_path / "weights", "--only", "vit", "--min-rate", "1000", "--stall-window", "0.3") == 1
    assert time.time() - t0 < 10  # about 1 s (window 0.3 s); room for a loaded machine
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "stalled" in errors[0] and "run again to resume" in errors[0]


def test_bad_index_is_not_kept_and_a_rerun_works(server, tmp_path, capsys):
    good = (server.root / HF / fetch.INDEX).read_text()
    (server.root / HF / fetch.INDEX).write_text("{not json")
    out = tmp_path / "weights"
    assert run(server, out, "--only", "llm") == 1
    assert "not valid JSON" in error_lines(capsys.readouterr().err)[0]
    assert not (out / "vicuna-7b" / fetch.INDEX).exists()
    (server.root / HF / fetch.INDEX).write_text(good)
    assert run(server, out, "--only", "llm") == 0


def test_bad_file_already_there_says_what_to_delete(tmp_path, capsys, server):
    out = tmp_path / "weights"
    out.mkdir()
    (out / "eva_vit_g.pth").write_bytes(b"not a checkpoint")
    assert run(server, out, "--only", "vit") == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"{out / 'eva_vit_g.pth'} is there but" in errors[0] and "delete it" in errors[0]


def test_404_is_one_clear_line(server, tmp_path, capsys):
    (server.root / VIT).unlink()
    assert run(server, tmp_path / "weights", "--only", "vit") == 1
    errors = error_lines(capsys.readouterr().err)
    assert errors == [f"error: {server.url}/{VIT}: HTTP 404 Not Found"]
    assert not (tmp_path / "weights").exists()  # nothing written, not even the folder


def test_missing_optional_file_is_skipped_with_a_note(server, tmp_path, capsys):
    (server.root / HF / "generation_config.json").unlink()
    out = tmp_path / "weights"
    assert run(server, out, "--only", "llm") == 0
    assert "generation_config.json: not on the server (404), skipped" in capsys.readouterr().err
    assert (out / "vicuna-7b" / "tokenizer.model").is_file()
    assert not (out / "vicuna-7b" / "generation_config.json").exists()


def test_bad_shard_name_in_index_is_refused(server, tmp_path, capsys):
    (server.root / HF / fetch.INDEX).write_text(json.dumps({"weight_map": {"w": "../../evil.bin"}}))
    assert run(server, tmp_path / "weights", "--only", "llm") == 1
    assert len(error_lines(capsys.readouterr().err)) == 1
    assert not (tmp_path / "evil.bin").exists()


def test_connection_refused_is_one_clear_line(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = fetch.main(["--out", str(tmp_path / "w"), "--only", "vit", "--base-url", f"http://127.0.0.1:{port}"])
    errors = error_lines(capsys.readouterr().err)
    assert rc == 1 and len(errors) == 1
    assert f"http://127.0.0.1:{port}/{VIT}: cannot connect" in errors[0]


def test_ctrl_c_keeps_part_for_resume(server, tmp_path, capsys, monkeypatch):
    out, data = tmp_path / "weights", (server.root / VIT).read_bytes()
    calls = []

    def interrupt(self, n):
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(download, "CHUNK", 4096)
    with monkeypatch.context() as m:
        m.setattr(download.Progress, "update", interrupt)
        assert run(server, out, "--only", "vit") == 130
    assert "Traceback" not in capsys.readouterr().err
    assert not (out / "eva_vit_g.pth").exists()
    kept = (out / "eva_vit_g.pth.part").read_bytes()
    assert 0 < len(kept) < len(data) and kept == data[:len(kept)]
    assert run(server, out, "--only", "vit") == 0
    assert server.log[-1] == ("/" + VIT, f"bytes={len(kept)}-")
    assert (out / "eva_vit_g.pth").read_bytes() == data


def test_llama2_is_not_downloaded_but_explained(server, tmp_path, capsys):
    assert run(server, tmp_path / "weights", "--only", "llm", model="llama2") == 0
    err = capsys.readouterr().err
    assert server.log == []
    assert URLS["llama2-7b"] in err and str(tmp_path / "weights" / "Llama-2-7b-chat-hf") in err
    assert URLS["proj"] in err


def test_bad_arguments(tmp_path, capsys):
    assert fetch.main(["--out", str(tmp_path), "--only", "vit,foo"]) == 2
    assert fetch.main(["--out", str(tmp_path), "--model", "proj"]) == 2
    assert fetch.main(["--out", str(tmp_path), "--base-url", "notaurl"]) == 1
    assert len(error_lines(capsys.readouterr().err)) == 3
