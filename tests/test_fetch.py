"""fetch.py against a local HTTP server laid out like the real hosts (never the internet): the folder it
builds, resume with Range (206 / 200 / 416), size checks, atomic finish, skipping, one-line errors."""
import http.server
import json
import shutil
import socket
import threading
import urllib.parse

import pytest
import torch

import fetch
from conftest import FIXTURES
from llama import Llama
from model import URLS, MiniGPT4, find_weights

TINY = FIXTURES / "reference" / "tiny"
BLIP2 = "sfr-vision-language-research/LAVIS/models/BLIP2"
HF = "Vision-CAIR/vicuna-7b/resolve/main"
VIT = f"{BLIP2}/eva_vit_g.pth"


class Server:
    """Serves files under `root` with Range support (206 + Content-Range, 416); knobs to misbehave."""

    def __init__(self, root):
        self.root, self.log = root, []  # log: (path, Range header or None) per GET
        self.ignore_range, self.extra_length, self.cut = False, 0, None
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                rng = self.headers.get("Range")
                srv.log.append((path, rng))
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
                self.send_header("Content-Length", str(len(body) + srv.extra_length))  # extra_length: a lie
                self.end_headers()
                self.wfile.write(body[:srv.cut])  # cut: the connection closes early

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


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
    out = {"eva_vit_g.pth": root / VIT, qformer: root / BLIP2 / qformer}
    out.update({f"vicuna-7b/{p.name}": p for p in (root / HF).iterdir()})
    return out


def run(srv, out, *extra, model="vicuna-7b"):
    return fetch.main(["--model", model, "--out", str(out), "--base-url", srv.url, *extra])


def error_lines(err):
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_full_fetch_builds_a_loadable_folder(server, tmp_path, capsys):
    out = tmp_path / "weights"
    assert run(server, out) == 0
    err = capsys.readouterr().err
    files = expected_files(server.root)
    assert len(files) == 10  # vit, qformer, index, 2 shards, config, tokenizer, 3 optional files
    for rel, src in files.items():
        assert (out / rel).read_bytes() == src.read_bytes(), rel
    assert not list(out.rglob("*.part"))
    assert all(rng is None for _, rng in server.log)  # nothing to resume
    assert "100%" in err and "MB/s" in err  # progress (plain lines: stderr is not a tty here)
    assert URLS["proj"] in err  # the projection is never downloaded: model.py's message says where from
    ours, ref = Llama.from_pretrained(out / "vicuna-7b"), Llama.from_pretrained(TINY / "llama")
    for (k, a), (k2, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # with the projection (Google Drive in real life) and the fixture dims, the whole model loads from it
    shutil.copy(TINY / "minigpt4_proj.pth", out / "minigpt4_proj.pth")
    shutil.copy(TINY / "config.json", out / "config.json")
    assert find_weights(str(out), "vicuna-7b")["llm"] == str(out / "vicuna-7b")
    assert MiniGPT4.from_pretrained(str(out), "vicuna-7b").llama_proj.weight.shape[0] == ref.cfg.dim


def test_complete_files_are_skipped_without_a_request(server, tmp_path, capsys):
    out = tmp_path / "weights"
    assert run(server, out) == 0
    server.log.clear()
    capsys.readouterr()
    assert run(server, out) == 0
    assert server.log == []
    assert "already there" in capsys.readouterr().err


def test_resume_sends_range_and_appends(server, tmp_path, capsys):
    out, data = tmp_path / "weights", (server.root / VIT).read_bytes()
    out.mkdir()
    (out / "eva_vit_g.pth.part").write_bytes(data[:1000])
    assert run(server, out, "--only", "vit") == 0
    assert server.log == [("/" + VIT, "bytes=1000-")]
    assert (out / "eva_vit_g.pth").read_bytes() == data
    assert not (out / "eva_vit_g.pth.part").exists()
    assert "resuming" in capsys.readouterr().err


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, capsys):
    out, data = tmp_path / "weights", (server.root / VIT).read_bytes()
    out.mkdir()
    (out / "eva_vit_g.pth.part").write_bytes(b"\0" * 1000)  # wrong bytes: must not survive the restart
    server.ignore_range = True
    assert run(server, out, "--only", "vit") == 0
    assert server.log == [("/" + VIT, "bytes=1000-")]
    assert (out / "eva_vit_g.pth").read_bytes() == data
    assert "ignored the range" in capsys.readouterr().err


@pytest.mark.parametrize("junk", [0, 7])
def test_416_part_already_complete_is_verified(server, tmp_path, capsys, junk):
    out, data = tmp_path / "weights", (server.root / VIT).read_bytes()
    out.mkdir()
    (out / "eva_vit_g.pth.part").write_bytes(data + b"x" * junk)
    rc = run(server, out, "--only", "vit")
    assert server.log == [("/" + VIT, f"bytes={len(data) + junk}-")]
    if junk == 0:  # the server says there is nothing after byte N and the file has N bytes: complete
        assert rc == 0 and (out / "eva_vit_g.pth").read_bytes() == data
    else:
        errors = error_lines(capsys.readouterr().err)
        assert rc == 1 and len(errors) == 1 and server.url + "/" + VIT in errors[0]
        assert not (out / "eva_vit_g.pth").exists()


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

    monkeypatch.setattr(fetch, "CHUNK", 4096)
    with monkeypatch.context() as m:
        m.setattr(fetch.Progress, "update", interrupt)
        assert run(server, out, "--only", "vit") == 130
    assert "Traceback" not in capsys.readouterr().err
    assert not (out / "eva_vit_g.pth").exists()
    assert (out / "eva_vit_g.pth.part").read_bytes() == data[:3 * 4096]
    assert run(server, out, "--only", "vit") == 0
    assert server.log[-1] == ("/" + VIT, f"bytes={3 * 4096}-")
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
    assert len(error_lines(capsys.readouterr().err)) == 2
