"""A third-party HBONE client for the tests: Python's ssl (OpenSSL) for mutual TLS 1.3 and
the `h2` package (hyper-h2) for HTTP/2, sending `CONNECT <authority>` and then one HTTP/1.1
request through the tunnel. Prints the inner response's status line and body.

usage: hbone_client.py HOST PORT CERT KEY CA AUTHORITY PATH [AUTHORIZATION]
"""

import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def main():
    host, port, cert, key, ca, authority, path = sys.argv[1:8]
    auth = sys.argv[8] if len(sys.argv) > 8 else None

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    # Mesh certificates carry SPIFFE URIs, not DNS names: the chain is verified, the name not.
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])

    raw = socket.create_connection((host, int(port)), timeout=10)
    sock = ctx.wrap_socket(raw)
    assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "CONNECT"), (":authority", authority)])
    sock.sendall(conn.data_to_send())

    inner = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + authority.encode() + b"\r\n"
    if auth:
        inner += b"Authorization: " + auth.encode() + b"\r\n"
    inner += b"Connection: close\r\n\r\n"

    connected = False
    received = b""
    done = False
    while not done:
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers)[b":status"]
                if status != b"200":
                    print("CONNECT refused:", status.decode())
                    return 2
                connected = True
                conn.send_data(stream, inner)
            elif isinstance(event, h2.events.DataReceived):
                received += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                done = True
        # The inner response is complete once its body length is in.
        if connected and b"\r\n\r\n" in received:
            head, _, body = received.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and len(body) >= int(value):
                    done = True
        sock.sendall(conn.data_to_send())
    head, _, body = received.partition(b"\r\n\r\n")
    print(head.split(b"\r\n")[0].decode())
    print(body.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
