"""Published models by name (models.pretrained): verified download into the hub cache, offline recipe,
``test_model.py --test_model NAME`` / ``--list_models`` and ``--pretrained NAME`` in training.

Every download goes to an http.server on 127.0.0.1 started here: the autouse fixture points
``COIC_WEIGHTS_URL`` at a port nobody listens on and refuses any other host, so nothing reaches
the internet. The BRN files come from ``../shared/reference`` when it is there, else stand-ins
registered for the test with their git blob ids from ``git hash-object``.
"""
import dataclasses
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
import torch
from helpers import REFERENCE, reference_file, train_flags

import models
import test_model
from models import build_encoder, build_model, pretrained
from models.coim import modulation_parameters
from models.pretrained import PublishedFile, PublishedModel
from utils.errors import UserError
from utils.eval.evaluation import load_model
from utils.eval.inference import restore
from utils.images import read_image
from utils.train.config import parse_train_args
from utils.train.trainer import Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hash_object(path) -> str:
    """The git blob id as git itself computes it (independent of models.pretrained)."""
    if shutil.which("git"):
        return subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True,
                              check=True).stdout.strip()
    data = open(path, "rb").read()  # no git here: git's documented object format, by hand
    return hashlib.sha1(f"blob {len(data)}".encode() + b"\x00" + data).hexdigest()


@pytest.fixture(autouse=True)
def no_internet(tmp_path, monkeypatch):
    """A temporary hub cache, no weights folder, a dead default URL and a guard on every open."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(pretrained.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.setenv(pretrained.BASE_URL_ENV, f"http://127.0.0.1:{_free_port()}")
    real_open = urllib.request.urlopen

    def local_only(url, *args, **kwargs):
        assert str(url).startswith("http://127.0.0.1:"), f"a test tried to reach {url}"
        return real_open(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)
    assert pretrained.cache_dir().startswith(str(tmp_path))


class Server:
    """Serves ``files`` ({url path: bytes}) on 127.0.0.1; ``hits`` lists the paths asked for; ``damage``
    ({url path: "flip" | "truncate" | "no_length"}) spoils a response on purpose."""

    def __init__(self):
        self.files, self.hits, self.damage = {}, [], {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                damage = server.damage.get(self.path, "")
                if damage == "stall":  # a server that never answers in time
                    time.sleep(1.0)
                    return
                if damage.startswith("no_length"):
                    self.protocol_version = "HTTP/1.0"  # the end of the body is the end of the connection
                self.send_response(200)
                if not damage.startswith("no_length"):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if damage == "flip":
                    body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
                elif damage in ("truncate", "no_length_truncate"):
                    body = body[: len(body) // 2]
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    s = Server()
    monkeypatch.setenv(pretrained.BASE_URL_ENV, s.url)
    yield s
    s.close()


def _serve(server, files: dict) -> None:
    server.files.update({f"/{path}": data for path, data in files.items()})


def _standin(tmp_path, monkeypatch, name, backbone="BRN", with_encoder=False, model_bytes=None):
    """Register a temporary entry whose files are checkpoints written here (its name declared by ``backbone``
    in the registry, its files in ``PUBLISHED_MODELS``); returns (entry, {path: bytes})."""
    folder = tmp_path / f"standin_{name}"
    folder.mkdir()
    torch.manual_seed(3)
    files = {}
    model_path = folder / "model.pth"
    if model_bytes is None:  # a baseline has no CoI-M generators
        torch.save(build_model(backbone, inter_iter=1, dim_in=128 if with_encoder else 0).state_dict(), model_path)
    else:
        model_path.write_bytes(model_bytes)
    kind = "CoIC" if with_encoder else "Baseline"
    model_file = PublishedFile(f"checkpoints/{kind}/{name}_model.pth", _hash_object(model_path))
    files[model_file.path] = model_path.read_bytes()
    encoder_file = None
    if with_encoder:
        enc_path = folder / "enc.pth"
        torch.save(build_encoder().state_dict(), enc_path)
        encoder_file = PublishedFile(f"checkpoints/{kind}/{name}_enc.pth", _hash_object(enc_path))
        files[encoder_file.path] = enc_path.read_bytes()
    entry = PublishedModel(name, backbone, "tran" if with_encoder else "normal", "test data", "a stand-in",
                           model_file, encoder_file)
    monkeypatch.setitem(pretrained.PUBLISHED_MODELS, name, entry)
    declared = models.BACKBONES[backbone]
    monkeypatch.setitem(models.BACKBONES, backbone, dataclasses.replace(
        declared, published_weights=declared.published_weights + (name,)))
    return entry, files


@pytest.fixture
def baseline(tmp_path, monkeypatch):
    """baseline-brn served from the reference file when present, else the registry's entry with a stand-in file
    (same path and description, the stand-in's blob id)."""
    entry = pretrained.PUBLISHED_MODELS["baseline-brn"]
    if os.path.isdir(REFERENCE):
        return entry, {entry.model.path: open(reference_file("brn_baseline_official.pth"), "rb").read()}
    standin, files = _standin(tmp_path, monkeypatch, "baseline-standin")
    entry = dataclasses.replace(entry, model=PublishedFile(entry.model.path, standin.model.blob_id))
    monkeypatch.setitem(pretrained.PUBLISHED_MODELS, "baseline-brn", entry)
    return entry, {entry.model.path: files[standin.model.path]}


@pytest.fixture
def coic(tmp_path, monkeypatch):
    """A CoIC entry with an encoder: the published CoIC BRN file when present (its encoder is not on this
    machine: a stand-in), else stand-ins for both."""
    model_bytes = open(reference_file("brn_coic_official.pth"), "rb").read() if os.path.isdir(REFERENCE) else None
    return _standin(tmp_path, monkeypatch, "coic-standin", with_encoder=True, model_bytes=model_bytes)


# --------------------------------------------------------------------------- registry and hashing
def test_git_blob_id_equals_git_hash_object(tmp_path):
    for k, data in enumerate([b"", b"hello\n", os.urandom(200_003)]):
        path = tmp_path / f"f{k}"
        path.write_bytes(data)
        assert pretrained.git_blob_id(str(path)) == _hash_object(path)


def test_registry_ids_match_the_published_brn_files():
    assert pretrained.PUBLISHED_MODELS["baseline-brn"].model.blob_id == _hash_object(
        reference_file("brn_baseline_official.pth"))
    assert pretrained.PUBLISHED_MODELS["coic-brn"].model.blob_id == _hash_object(
        reference_file("brn_coic_official.pth"))


def test_registry_entries_are_consistent():
    from models import available_models

    # the registry declares every entry, in the order --list_models prints them
    assert pretrained.published_names() == ["baseline-brn", "coic-brn", "baseline-rcdnet", "coic-rcdnet"]
    assert pretrained.published_models() == pretrained.PUBLISHED_MODELS
    names = set()
    for name, m in pretrained.PUBLISHED_MODELS.items():
        assert m.name == name and m.backbone in available_models()
        assert (m.load_mode == "tran") == (m.encoder is not None) == name.startswith("coic-")
        for f in m.files:
            assert len(f.blob_id) == 40 and f.path.startswith("checkpoints/")
            names.add(f.local_name)
    assert len(names) == 6  # baseline and CoIC files of one backbone never share a cache name


# --------------------------------------------------------------------------- download, verification, cache
def test_download_verifies_and_lands_in_the_hub_cache(baseline, server, capfd):
    entry, files = baseline
    _serve(server, files)
    path, encoder = pretrained.fetch_model(entry)
    assert encoder is None
    assert path == os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints", "coic", "baseline_brn_model.pth")
    assert open(path, "rb").read() == files[entry.model.path]
    assert server.hits == [f"/{entry.model.path}"]
    assert os.listdir(os.path.dirname(path)) == ["baseline_brn_model.pth"]  # no temporary file left
    err = capfd.readouterr().err
    assert "baseline_brn_model.pth" in err and "100%" in err  # the progress bar ran to the end
    # the cache is reused: no second request
    assert pretrained.fetch_model(entry)[0] == path
    assert len(server.hits) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_length_truncate"])
def test_corrupt_or_truncated_download_is_rejected(baseline, server, damage):
    entry, files = baseline
    _serve(server, files)
    server.damage[f"/{entry.model.path}"] = damage
    with pytest.raises(UserError) as exc:
        pretrained.fetch_model(entry, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and entry.model.path in msg
    assert ("cut short" in msg) if damage == "truncate" else (entry.model.blob_id in msg)
    assert os.listdir(pretrained.cache_dir()) == []  # neither the final name nor a temporary file


def test_download_without_content_length_is_verified_after(baseline, server):
    entry, files = baseline
    _serve(server, files)
    server.damage[f"/{entry.model.path}"] = "no_length"
    path, _ = pretrained.fetch_model(entry, progress=False)
    assert open(path, "rb").read() == files[entry.model.path]


def test_corrupt_cached_file_is_replaced_not_loaded(baseline, server, caplog):
    entry, files = baseline
    _serve(server, files)
    path, _ = pretrained.fetch_model(entry, progress=False)
    with open(path, "r+b") as f:  # one byte changed in the cache
        f.seek(50)
        byte = f.read(1)
        f.seek(50)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "corrupt" in pretrained.availability(entry)
    with caplog.at_level("WARNING", logger="coic"):
        assert pretrained.fetch_model(entry, progress=False)[0] == path
    assert "corrupt" in caplog.text
    assert len(server.hits) == 2 and open(path, "rb").read() == files[entry.model.path]


def test_offline_message_names_urls_and_destinations(coic):
    entry, _ = coic
    dead = os.environ[pretrained.BASE_URL_ENV]  # the autouse fixture's: a port nobody listens on
    with pytest.raises(UserError) as exc:
        pretrained.fetch_model(entry, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg
    for f in entry.files:  # both files: where to download them, where to put them
        assert f"{dead}/{f.path}" in msg
        assert os.path.join(pretrained.cache_dir(), f.local_name) in msg
    assert "--weights_dir" in msg and pretrained.WEIGHTS_DIR_ENV in msg
    assert not os.path.isdir(pretrained.cache_dir()) or os.listdir(pretrained.cache_dir()) == []


def test_http_error_is_one_line(server, tmp_path, monkeypatch):
    entry, _ = _standin(tmp_path, monkeypatch, "missing-on-server", model_bytes=b"x" * 300)
    with pytest.raises(UserError) as exc:  # nothing served: 404
        pretrained.fetch_model(entry, progress=False)
    assert "HTTP 404" in str(exc.value) and f"{server.url}/{entry.model.path}" in str(exc.value)


def test_timeout_is_one_line(baseline, server, monkeypatch):
    entry, files = baseline
    _serve(server, files)
    server.damage[f"/{entry.model.path}"] = "stall"
    monkeypatch.setattr(pretrained, "TIMEOUT_S", 0.2)
    with pytest.raises(UserError) as exc:
        pretrained.fetch_model(entry, progress=False)
    assert "timed out" in str(exc.value) and "--weights_dir" in str(exc.value)


def test_the_guard_refuses_the_real_url(monkeypatch):
    monkeypatch.delenv(pretrained.BASE_URL_ENV)
    with pytest.raises(AssertionError, match="raw.githubusercontent.com"):
        pretrained.fetch_model(pretrained.PUBLISHED_MODELS["coic-brn"], progress=False)


def test_weights_dir_layouts_without_network(coic, tmp_path, monkeypatch):
    entry, files = coic  # the default URL is dead: any download attempt would fail
    layouts = {
        "clone": lambda f: f.path,  # a clone of the authors' repository
        "checkpoints": lambda f: f.path.split("/", 1)[1],  # its checkpoints/ folder
        "flat": lambda f: f.local_name,  # a copy of the cache folder
    }
    for label, where in layouts.items():
        folder = tmp_path / label
        for f in entry.files:
            target = folder / where(f)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(files[f.path])
        model_path, enc_path = pretrained.fetch_model(entry, weights_dir=str(folder))
        assert (model_path, enc_path) == tuple(str(folder / where(f)) for f in entry.files)
        assert pretrained.availability(entry, str(folder)) == "in --weights_dir"
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(tmp_path / "flat"))  # the variable does the same
    assert pretrained.fetch_model(entry)[0] == str(tmp_path / "flat" / entry.model.local_name)
    assert not os.path.exists(pretrained.cache_dir())  # nothing was downloaded


def test_weights_dir_wrong_or_missing_file(coic, tmp_path):
    entry, files = coic
    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(UserError) as exc:
        pretrained.fetch_model(entry, weights_dir=str(folder))
    assert str(folder / entry.model.local_name) in str(exc.value)  # says where it looked
    wrong = folder / entry.model.local_name
    wrong.write_bytes(files[entry.model.path][:-1])
    with pytest.raises(UserError) as exc:
        pretrained.fetch_model(entry, weights_dir=str(folder))
    assert entry.model.blob_id in str(exc.value)
    assert wrong.exists()  # the user's file is reported, not deleted


# --------------------------------------------------------------------------- test_model.py
def _listing(capsys) -> dict:
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}


def test_list_models(baseline, server, capsys):
    entry, files = baseline
    _serve(server, files)
    assert test_model.main(["--list_models"]) == 0
    rows = _listing(capsys)
    for name in ("baseline-brn", "coic-brn", "baseline-rcdnet", "coic-rcdnet"):
        assert name in rows and "not cached" in rows[name] and "Rain200L" in rows[name]
    assert rows["coic-rcdnet"].split()[1:3] == ["RCDNet", "tran"]
    pretrained.fetch_model(entry, progress=False)
    assert test_model.main(["--list_models"]) == 0
    rows = _listing(capsys)
    assert "not cached" not in rows["baseline-brn"] and "cached" in rows["baseline-brn"]
    assert "not cached" in rows["coic-brn"]


def test_test_model_flag_errors(capsys, server, tmp_path, tiny_demo):
    with pytest.raises(SystemExit) as exc:
        test_model.main([])
    assert exc.value.code == 2 and "--test_model is required" in capsys.readouterr().err
    cases = [(["--test_model", "coic-brn", "--model_name", "RCDNet"], "not RCDNet"),
             (["--test_model", "baseline-brn", "--load_mode", "tran"], "without CoIC"),
             (["--test_model", "coic-nope"], "baseline-brn, coic-brn, baseline-rcdnet, coic-rcdnet")]
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    for flags, expected in cases:
        assert test_model.main(flags + ["--test_dir", test_dir, "--save_path", str(tmp_path / "out")]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
        assert len(err) == 1 and expected in err[0]
    assert server.hits == []  # all decided before any download


def test_test_model_by_name_end_to_end(baseline, server, tiny_demo, tmp_path):
    entry, files = baseline
    reference = reference_file("brn_baseline_official.pth")
    _serve(server, files)
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    out = tmp_path / "by_name"
    assert test_model.main(["--test_model", "baseline-brn", "--test_dir", test_dir, "--save_path", str(out)]) == 0
    assert server.hits == [f"/{entry.model.path}"]
    # the reference file's own model, run here directly on the same images
    model, _ = load_model("BRN", reference, "normal", torch.device("cpu"))
    names = sorted(os.listdir(os.path.join(test_dir, "rain")))
    assert len(names) == 4
    for name in names:
        x = read_image(os.path.join(test_dir, "rain", name)).unsqueeze(0)
        with torch.no_grad():
            y = restore(model, x)[0].clamp(0, 1)
        saved = read_image(str(out / (os.path.splitext(name)[0] + ".png")))
        assert float((saved - y).abs().max()) <= 0.5 / 255 + 1e-6  # the 8-bit rounding only
    # again: the cache serves it
    assert test_model.main(["--test_model", "baseline-brn", "--test_dir", test_dir,
                            "--save_path", str(tmp_path / "again")]) == 0
    assert len(server.hits) == 1


def test_test_model_coic_name_brings_its_encoder(coic, server, tiny_demo, tmp_path):
    entry, files = coic
    _serve(server, files)
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    # no --model_name or --feat_ext; the un-modulated run first (--load_mode normal), which needs no encoder
    assert test_model.main(["--test_model", entry.name, "--load_mode", "normal", "--test_dir", test_dir,
                            "--save_path", str(tmp_path / "n")]) == 0
    assert server.hits == [f"/{entry.model.path}"]
    assert test_model.main(["--test_model", entry.name, "--test_dir", test_dir, "--save_path", str(tmp_path / "t")]) == 0
    assert server.hits == [f"/{f.path}" for f in entry.files]  # modulated: the encoder came along
    # modulated outputs differ from the un-modulated ones
    name = sorted(os.listdir(tmp_path / "n"))[0]
    assert not torch.equal(read_image(str(tmp_path / "n" / name)), read_image(str(tmp_path / "t" / name)))


def test_an_existing_path_wins_over_a_name(server, tmp_path, tiny_demo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(build_model("BRN", inter_iter=1, dim_in=0).state_dict(), "baseline-brn")
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    assert test_model.main(["--test_model", "baseline-brn", "--test_dir", test_dir, "--save_path", "out"]) == 0
    assert server.hits == [] and len(os.listdir("out")) == 7  # 4 images, results.csv, index.html, report/


def test_a_checkpoint_of_ours_names_its_backbone(tmp_path, tiny_demo, monkeypatch):
    """Without --model_name, a checkpoint that names its backbone runs as that backbone; one that names
    none (a published state_dict) is read as BRN, as the published test script does."""
    monkeypatch.chdir(tmp_path)
    hparams = dict(num_map=2, num_channel=4, num_block=1, inter_iter=1)
    model = build_model("RCDNet", dim_in=0, **hparams)
    torch.save({"model_name": "RCDNet", "model_hparams": hparams, "model": model.state_dict()}, "ours.pth")
    torch.save(build_model("BRN", inter_iter=1, dim_in=0).state_dict(), "theirs.pth")
    assert pretrained.choose_checkpoint("ours.pth", None, None).model_name == "RCDNet"
    assert pretrained.choose_checkpoint("ours.pth", "BRN", None).model_name == "BRN"  # the flag wins
    assert pretrained.choose_checkpoint("theirs.pth", None, None).model_name == "BRN"
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    assert test_model.main(["--test_model", "ours.pth", "--test_dir", test_dir, "--save_path", "out"]) == 0
    assert len(os.listdir("out")) == 7


# --------------------------------------------------------------------------- training --pretrained NAME
def _train_config(tmp_path, tiny_demo, **flags):
    return parse_train_args("BRN", train_flags(str(tmp_path / "run"), os.path.join(tiny_demo, "heavy", "train"),
                                               tot_iters=2, stage1_iters=1, **flags))


def test_pretrained_baseline_name_fine_tunes_from_its_weights(baseline, server, tiny_demo, tmp_path):
    entry, files = baseline
    _serve(server, files)
    trainer = Trainer(_train_config(tmp_path, tiny_demo, pretrained="baseline-brn"))
    assert server.hits == [f"/{entry.model.path}"]
    published = torch.load(pretrained.fetch(entry.model), map_location="cpu")
    generators = {id(p) for p in modulation_parameters(trainer.model)}
    backbone = [p for p in trainer.model.parameters() if id(p) not in generators]
    # every tensor of the file is in the backbone, unchanged (matched by value, not through the key mapping)
    assert len(backbone) == len(published)
    assert sorted(float(p.detach().double().sum()) for p in backbone) == sorted(float(t.double().sum())
                                                                     for t in published.values())
    trainer.train()  # and fine-tuning runs through both stages


def test_pretrained_coic_name_brings_the_encoder(coic, server, tiny_demo, tmp_path):
    entry, files = coic
    _serve(server, files)
    trainer = Trainer(_train_config(tmp_path, tiny_demo, pretrained=entry.name))
    assert server.hits == [f"/{f.path}" for f in entry.files]
    saved = torch.load(pretrained.fetch(entry.encoder), map_location="cpu")
    own = trainer.encoder.state_dict()
    assert set(saved) == set(own) and all(torch.equal(saved[k], own[k]) for k in own)


def test_pretrained_name_offline_and_wrong_backbone(tiny_demo, tmp_path, capsys):
    with pytest.raises(UserError) as exc:  # the dead URL of the autouse fixture
        Trainer(_train_config(tmp_path, tiny_demo, pretrained="baseline-brn"))
    assert "--weights_dir" in str(exc.value) and "checkpoints/Baseline/brn_model.pth" in str(exc.value)
    with pytest.raises(SystemExit):
        _train_config(tmp_path, tiny_demo, pretrained="coic-rcdnet")
    assert "train_RCDNet.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train_config(tmp_path, tiny_demo, pretrained="brn-typo")
    assert "coic-brn" in capsys.readouterr().err
