"""The OpenAI API's own transport: HTTPS (--openai-certfile/--openai-keyfile), its own bind address
(--openai-address) and --header-timeout, which closes a connection that does not finish its request's
head in time (uvicorn alone kept a silent or slow-loris connection open for good)."""
from __future__ import annotations

import concurrent.futures
import os
import socket
import ssl
import subprocess
import sys
import time

import pytest
from conftest import folder
from test_generate import A1

from ia3_export.serve.process import free_ports

HOST = "127.0.0.2"  # the OpenAI API alone listens here; Triton stays on 127.0.0.1
HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def authority():
    import trustme
    return trustme.CA()


@pytest.fixture(scope="module")
def https(start_server, authority, tmp_path_factory):
    pem = tmp_path_factory.mktemp("tls")
    issued = authority.issue_cert(HOST)
    issued.cert_chain_pems[0].write_to_path(str(pem / "cert.pem"))
    issued.private_key_pem.write_to_path(str(pem / "key.pem"))
    port = free_ports(1)[0]
    server = start_server(folder("llama-bank"), "--openai-port", str(port), "--openai-address", HOST,
                          "--openai-certfile", str(pem / "cert.pem"), "--openai-keyfile", str(pem / "key.pem"),
                          "--header-timeout", str(HEADER_TIMEOUT_S))
    server.openai_port = port
    server.context = ssl.create_default_context()
    authority.configure_trust(server.context)
    return server


def test_the_openai_client_over_https_equals_alone(https, reference):
    import httpx
    import openai
    ref = reference("llama-bank")
    expected = ref.decode(ref.generate([5, 6, 7], A1, 10))
    assert f"OpenAI API https://{HOST}:{https.openai_port}/v1" in https.log
    with httpx.Client(verify=https.context) as http:
        client = openai.OpenAI(base_url=f"https://{HOST}:{https.openai_port}/v1", api_key="unused", http_client=http)
        assert client.completions.create(model=A1, prompt=[5, 6, 7], max_tokens=10).choices[0].text == expected
        streamed = client.completions.create(model=A1, prompt=[5, 6, 7], max_tokens=10, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the HTTPS port
            httpx.get(f"http://{HOST}:{https.openai_port}/v1/models", timeout=10)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # a client that does not trust it
            httpx.get(f"https://{HOST}:{https.openai_port}/v1/models", timeout=10)
    with pytest.raises(ConnectionRefusedError):  # --openai-address: nothing of it on --address
        socket.create_connection(("127.0.0.1", https.openai_port), timeout=5).close()


def closed_after(sock: ssl.SSLSocket, trickle: bytes = b"", limit_s: float = 10) -> float:
    """Seconds until the server closes `sock`, sending it `trickle` one byte every 0.1 s meanwhile."""
    start, sock_timeout = time.monotonic(), 0.1
    sock.settimeout(sock_timeout)
    for i in range(int(limit_s / sock_timeout)):
        try:
            if i < len(trickle):
                sock.send(trickle[i:i + 1])
            if sock.recv(100) == b"":
                return time.monotonic() - start
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except OSError:  # reset, broken pipe, or the TLS layer's own end of it
            return time.monotonic() - start
    return float("inf")


def test_a_connection_that_never_finishes_its_head_is_closed(https):
    """Silent after connecting, silent after an answer (kept alive), or trickling its headers a byte at a time:
    each is closed at --header-timeout, while a body sent slowly (its head in time) is still answered."""
    def connect() -> ssl.SSLSocket:
        return https.context.wrap_socket(socket.create_connection((HOST, https.openai_port), timeout=10),
                                         server_hostname=HOST)

    request = f"GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    silent, kept, trickling = connect(), connect(), connect()
    kept.sendall(request)
    assert kept.recv(12) == b"HTTP/1.1 200"
    head = f"GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode() + b"a" * 200
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # timed together: their clocks run together
        times = list(pool.map(closed_after, [silent, kept, trickling], [b"", b"", head]))
    assert all(HEADER_TIMEOUT_S * 0.8 < t < HEADER_TIMEOUT_S + 3 for t in times), times

    body = b'{"model": "%s", "prompt": [5, 6, 7], "max_tokens": 2}' % A1.encode()
    slow = connect()
    slow.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode())
    for i in range(0, len(body), 10):  # 2.5x the header timeout, in the body
        time.sleep(HEADER_TIMEOUT_S / 2)
        slow.sendall(body[i:i + 10])
    assert slow.recv(12) == b"HTTP/1.1 200"


@pytest.mark.parametrize("options,message", [
    (["--openai-certfile", "cert.pem"], "--openai-certfile and --openai-keyfile go together"),
    (["--openai-certfile", "missing.pem", "--openai-keyfile", "key.pem"], "--openai-certfile 'missing.pem' is not a file"),
    (["--openai-certfile", "", "--openai-keyfile", "key.pem"], "--openai-certfile '' is not a file"),
    (["--openai-certfile", "cert.pem", "--openai-keyfile", "other.pem"], "are not a PEM certificate and its private key"),
    (["--openai-certfile", "key.pem", "--openai-keyfile", "key.pem"], "are not a PEM certificate and its private key"),
    (["--header-timeout", "0"], "--header-timeout"),
], ids=["no key", "missing", "empty", "other key", "not a certificate", "zero timeout"])
def test_a_bad_tls_setup_is_one_line_before_anything_starts(authority, tmp_path, options, message):
    issued, other = authority.issue_cert(HOST), authority.issue_cert(HOST)
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "other.pem"))
    exe = os.path.join(os.path.dirname(sys.executable), "ia3-export")
    done = subprocess.run([exe, "serve", folder("llama-bank"), "--openai-port", str(free_ports(1)[0]), *options],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
