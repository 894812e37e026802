"""Security: safe weight loading, no request field reaching the filesystem, gRPC TLS, loopback default.

- Static: every `torch.load` in the source tree passes weights_only=True; no pickle/dill/joblib/
  cloudpickle loads, no np.load(allow_pickle=True), no yaml.load without a safe loader, no
  torch.jit.load, no trust_remote_code=True, no eval/exec (AST scan, not a text grep, so
  comments and strings do not count and keyword arguments are checked for real).
- Runtime: the preprocessing code opens no file while handling requests (Python audit hook on
  "open"), and over the wire an IMAGE that is a path is just bytes that are not an image.
- TLS: a test CA and certificates made with the `cryptography` package (a dev requirement),
  tritonserver with --grpc-use-ssl via ServerConfig(grpc_tls_cert=..., grpc_tls_key=...): a TLS
  client with the certificate as root succeeds, a plaintext client and a client trusting another
  root fail; mutual TLS refuses a client without a certificate. See docs/tls.md.
- `mmrec serve` binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import ast
import datetime
import ipaddress
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mmrec import schema
from mmrec.client import MMRecClient
from mmrec.server import ServerConfig, ServerError, TritonServer, build_command, free_ports
from test_bad_inputs import OUTPUTS, TOLERANCE, FakePbUtils, column, infer
from toy_models import DOUBLE_CONFIG, DOUBLE_MODEL, write_model

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("mmrec", "export", "client", "benchmarks", "deploy", "model_repository")


# ---- static scan -------------------------------------------------------------------------------

def _dotted(node: ast.AST) -> str:
    """'torch.load' for torch.load(...), 'pickle.loads' for pickle.loads(...), 'eval' for eval(...)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


UNSAFE_MODULES = ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")


def unsafe_calls(path: Path, root: Path = ROOT) -> list[str]:
    """Findings in one file: 'file:line: what'."""
    findings = []
    tree = ast.parse(path.read_text(), filename=str(path))
    imported: dict[str, str] = {}  # local name -> module.attr, for `from torch import load`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        name = imported.get(name, name)
        where = f"{path.relative_to(root)}:{node.lineno}"
        module, _, attr = name.rpartition(".")
        if name.endswith("torch.load") or name == "torch.load":
            if not _is_true(_keyword(node, "weights_only")):
                findings.append(f"{where}: torch.load without weights_only=True")
        elif module.split(".")[0] in UNSAFE_MODULES and attr in ("load", "loads", "open", "Unpickler"):
            findings.append(f"{where}: {name} (arbitrary code on load)")
        elif name in ("np.load", "numpy.load") and _is_true(_keyword(node, "allow_pickle")):
            findings.append(f"{where}: {name}(allow_pickle=True)")
        elif name in ("yaml.load", "yaml.load_all") and not (
                (k := _keyword(node, "Loader")) is not None and "Safe" in _dotted(k)):
            findings.append(f"{where}: {name} without a SafeLoader")
        elif name.endswith("jit.load"):
            findings.append(f"{where}: {name} (TorchScript runs code)")
        elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):  # not model.eval()
            findings.append(f"{where}: {name}()")
        if _is_true(_keyword(node, "trust_remote_code")):
            findings.append(f"{where}: trust_remote_code=True")
    return findings


def source_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py"))


def test_weights_load_only_from_safetensors_onnx_or_weights_only_torch_load():
    files = source_files()
    assert len(files) > 20, "the scan found no source files"
    findings = [f for path in files for f in unsafe_calls(path)]
    assert not findings, "\n".join(findings)
    # not vacuous: the image weights really are read with torch.load(weights_only=True)
    loads = [p for p in files if "torch.load(" in p.read_text() or "safe_open" in p.read_text()]
    assert loads, "no weight loading found at all: has the scan lost the export package?"


def test_the_scanner_catches_what_it_must(tmp_path):
    bad = tmp_path / "unsafe_example.py"
    bad.write_text(textwrap.dedent("""
        import pickle, torch, yaml, numpy as np
        from torch import load
        torch.load("w.pt")
        torch.load("w.pt", weights_only=False)
        load("w.pt")
        pickle.loads(b"")
        np.load("x.npy", allow_pickle=True)
        yaml.load("a: 1")
        torch.jit.load("m.pt")
        AutoModel.from_pretrained("x", trust_remote_code=True)
        eval("1")
        torch.load("ok.pt", weights_only=True)
        yaml.load("a: 1", Loader=yaml.SafeLoader)
    """))
    findings = unsafe_calls(bad, root=tmp_path)
    assert len(findings) == 9, findings


# ---- requests never reach the filesystem ----------------------------------------------------------

class OpenRecorder:
    """A Python audit hook recording file opens while armed (hooks cannot be removed: one per process)."""

    _instance = None

    def __init__(self) -> None:
        self.armed = threading.local()
        self.opened: list[str] = []
        sys.addaudithook(self._hook)

    @classmethod
    def get(cls) -> "OpenRecorder":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _hook(self, event: str, args: tuple) -> None:
        if event in ("open", "os.open") and getattr(self.armed, "on", False):
            self.opened.append(repr(args[0]))

    def __enter__(self) -> "OpenRecorder":
        self.opened.clear()
        self.armed.on = True
        return self

    def __exit__(self, *exc) -> None:
        self.armed.on = False


def test_preprocessing_opens_no_file_whatever_the_request_says(exported_repository, sample_items, monkeypatch,
                                                               tmp_path):
    from mmrec.export.repository import CONFIG_FILE, parse
    from triton_models import load_served_model
    from google.protobuf import json_format
    import json

    real_png = tmp_path / "real.png"
    real_png.write_bytes(sample_items[0][1])
    fake = FakePbUtils()
    models = {}
    for name in (schema.TOKENIZER, schema.IMAGE_PREPROCESS):  # initialize reads its files: not armed yet
        module = load_served_model(exported_repository, name)
        monkeypatch.setattr(module, "pb_utils", fake)
        config = json_format.MessageToDict(parse((Path(exported_repository) / name / CONFIG_FILE).read_text()),
                                           preserving_proto_field_name=True)
        models[name] = module.TritonPythonModel()
        models[name].initialize({"model_config": json.dumps(config), "model_name": name,
                                 "model_repository": str(Path(exported_repository) / name), "model_version": "1"})
    paths = [str(real_png).encode(), b"/etc/passwd", b"file:///etc/passwd", b"../../../../etc/passwd",
             str(Path(exported_repository) / "tokenizer" / "1" / "tokenizer.json").encode()]

    def handle():
        images = models[schema.IMAGE_PREPROCESS].execute([{schema.IMAGE: column([p])} for p in paths]
                                                         + [{schema.IMAGE: column([sample_items[0][1]])}])
        return images, models[schema.TOKENIZER].execute([{schema.TEXT: column([p])} for p in paths])

    handle()  # once unarmed: lazy imports (Pillow plugins) open their own .py files legitimately
    with OpenRecorder.get() as recorder:
        images, texts = handle()
    assert not recorder.opened, recorder.opened
    assert all(r.error is not None and "not a decodable JPEG/PNG/WebP image" in r.error.message for r in images[:-1])
    assert images[-1].error is None  # the real bytes decode, without any open()
    assert all(r.error is None for r in texts)  # a path in TEXT is just text


@pytest.mark.server
@pytest.mark.timeout(300)
def test_paths_in_requests_are_bytes_not_files(triton_server, reference, sample_items, tmp_path):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    real_png = tmp_path / "served-file-must-not-be-read.png"
    real_png.write_bytes(sample_items[0][1])
    client = grpcclient.InferenceServerClient(triton_server.urls["grpc"])
    try:
        for path in (str(real_png).encode(), f"file://{real_png}".encode(), b"/etc/passwd"):
            with pytest.raises(InferenceServerException, match=r"IMAGE\[0\] is not a decodable JPEG/PNG/WebP"):
                infer(client, "grpc", schema.ITEM_ENCODER,
                      {schema.TEXT: (column([b"a path"]), "BYTES"), schema.IMAGE: (column([path]), "BYTES")})
        # the path as TEXT is embedded as the literal string
        got = infer(client, "grpc", schema.ITEM_ENCODER,
                    {schema.TEXT: (column([b"/etc/passwd"]), "BYTES"),
                     schema.IMAGE: (column([sample_items[0][1]]), "BYTES")}, OUTPUTS[schema.ITEM_ENCODER])
    finally:
        client.close()
    want = reference.encode_items(["/etc/passwd"], [sample_items[0][1]])
    np.testing.assert_allclose(got[schema.ITEM_EMBEDDING], want[schema.ITEM_EMBEDDING], atol=TOLERANCE)


# ---- TLS ----------------------------------------------------------------------------------------

def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _certificate(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Certificate | None = None,
                 issuer_key: rsa.RSAPrivateKey | None = None, usage: x509.ObjectIdentifier | None = None,
                 names: list[x509.GeneralName] | None = None) -> x509.Certificate:
    """A CA certificate (no issuer: self-signed, may sign others) or a leaf signed by `issuer`."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    is_ca = issuer is None
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(name if is_ca else issuer.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key if is_ca else issuer_key, hashes.SHA256())


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, both signed by
    the CA, plus an unrelated self-signed 'other' root; PEM files, made with `cryptography`."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}

    def save(stem: str, certificate: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
        files[f"{stem}.pem"] = certificate.public_bytes(serialization.Encoding.PEM)
        files[f"{stem}.key"] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption())

    ca_key = _key()
    ca = _certificate("mmrec test CA", ca_key)
    save("ca", ca, ca_key)
    server_key = _key()
    save("server", _certificate("localhost", server_key, ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH,
                                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
         server_key)
    client_key = _key()
    save("client", _certificate("mmrec test client", client_key, ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH),
         client_key)
    other_key = _key()
    save("other", _certificate("someone else", other_key), other_key)
    for file_name, data in files.items():
        (folder / file_name).write_bytes(data)
    return {n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key", "other.pem")}


# a throwaway CA and a one-model toy repository: cheap to build twice, so the export-free tests may
# run before the session export is ready (tests/session_export.py)
SPLIT_SAFE_FIXTURES = ("certificates", "toy_repository")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def toy_repository(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("tls-repo")
    write_model(repo, "double", DOUBLE_CONFIG, DOUBLE_MODEL)
    return repo


def tls_server(repo: Path, certificates: dict[str, Path], log: Path, mutual: bool = False) -> TritonServer:
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          grpc_tls_cert=certificates["server.pem"], grpc_tls_key=certificates["server.key"],
                          grpc_tls_root_cert=certificates["ca.pem"] if mutual else None)
    return TritonServer(config, log_path=log, ready_timeout_s=120)


def _double(url: str, **tls) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url, **tls)
    try:
        x = np.array([[1.5, -2.0, 3.0]], dtype=np.float32)
        tensor = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("double", [tensor], client_timeout=20)
        return result.as_numpy("OUTPUT0")
    finally:
        client.close()


@pytest.mark.server
@pytest.mark.timeout(400)
def test_grpc_tls_serves_tls_clients_and_refuses_plaintext(exported_repository, reference, sample_items,
                                                           certificates, tmp_path):
    """The real repository over TLS: tritonclient and MMRecClient with the CA as root get correct
    answers; a plaintext client and a client trusting another root are refused."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    text, image, _ = sample_items[0]
    want = reference.encode_items([text], [image])
    tensors = {schema.TEXT: (column([text.encode()]), "BYTES"), schema.IMAGE: (column([image]), "BYTES")}
    ca = str(certificates["ca.pem"])

    def call(**tls):
        client = grpcclient.InferenceServerClient(url, **tls)
        try:
            return infer(client, "grpc", schema.ITEM_ENCODER, tensors, OUTPUTS[schema.ITEM_ENCODER])
        finally:
            client.close()

    with tls_server(Path(exported_repository), certificates, tmp_path / "triton.log") as server:
        url = server.urls["grpc"]
        got = call(ssl=True, root_certificates=ca)
        with pytest.raises(InferenceServerException) as plaintext:
            call()
        with pytest.raises(InferenceServerException) as wrong_root:
            call(ssl=True, root_certificates=str(certificates["other.pem"]))
        with MMRecClient(url, ssl=True, root_certificates=ca) as client:
            encoded = client.encode_items([(text, image)])
        np.testing.assert_allclose(encoded.item_embedding, want[schema.ITEM_EMBEDDING], atol=TOLERANCE)
    np.testing.assert_allclose(got[schema.ITEM_EMBEDDING], want[schema.ITEM_EMBEDDING], atol=TOLERANCE)
    assert "UNAVAILABLE" in str(plaintext.value.status()), plaintext.value
    assert "UNAVAILABLE" in str(wrong_root.value.status()), wrong_root.value
    assert "--grpc-use-ssl=true" in " ".join(build_command_for(server.config))


@pytest.mark.server
@pytest.mark.timeout(300)
def test_grpc_mutual_tls_requires_a_client_certificate(toy_repository, certificates, tmp_path):
    from tritonclient.utils import InferenceServerException

    with tls_server(toy_repository, certificates, tmp_path / "triton.log", mutual=True) as server:
        url = server.urls["grpc"]
        with pytest.raises(InferenceServerException) as anonymous:
            _double(url, ssl=True, root_certificates=str(certificates["ca.pem"]))
        np.testing.assert_array_equal(
            _double(url, ssl=True, root_certificates=str(certificates["ca.pem"]),
                    private_key=str(certificates["client.key"]), certificate_chain=str(certificates["client.pem"])),
            [[3.0, -4.0, 6.0]])
    assert "UNAVAILABLE" in str(anonymous.value.status()), anonymous.value


def build_command_for(config: ServerConfig) -> list[str]:
    from mmrec.server import find_tritonserver

    install = find_tritonserver()
    return build_command(install, Path("/backends"), Path(config.repository), config, "prefix_")


def test_tls_config_is_validated(tmp_path):
    repo = tmp_path
    with pytest.raises(ServerError, match="both a certificate and its private key"):
        ServerConfig(repository=repo, grpc_tls_cert=tmp_path / "c.pem")
    with pytest.raises(ServerError, match="mutual TLS"):
        ServerConfig(repository=repo, grpc_tls_root_cert=tmp_path / "ca.pem")
    config = ServerConfig(repository=repo, grpc_tls_cert=tmp_path / "missing.pem", grpc_tls_key=tmp_path / "k.pem")
    with pytest.raises(ServerError, match="--grpc-tls-cert .*missing.pem is not a readable file"):
        config.check_tls_files()
    assert ServerConfig(repository=repo).tls_args() == []


def test_serve_cli_passes_tls_flags_and_binds_loopback_by_default(monkeypatch, tmp_path, exported_repository):
    from typer.testing import CliRunner

    import mmrec.serve_cli as serve_cli
    from mmrec.cli import app

    captured = []

    def fake_serve_forever(config, on_ready=None, **kwargs):
        captured.append(config)
        return 0

    monkeypatch.setattr(serve_cli, "serve_forever", fake_serve_forever)
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--repository", str(exported_repository)])
    assert result.exit_code == 0, result.output
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    result = runner.invoke(app, ["serve", "--repository", str(exported_repository), "--grpc-tls-cert", str(cert),
                                 "--grpc-tls-key", str(key)])
    assert result.exit_code == 0, result.output
    default, tls = captured
    assert default.host == "127.0.0.1" and not default.grpc_tls
    assert (tls.grpc_tls_cert, tls.grpc_tls_key) == (cert, key)
    assert ServerConfig(repository=tmp_path).host == "127.0.0.1"
    command = " ".join(build_command_for(default))
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"):
        assert flag in command
