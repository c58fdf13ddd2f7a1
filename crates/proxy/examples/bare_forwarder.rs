//! The floor under Waystone's HTTP/1.1 path: a keep-alive reverse proxy on the same runtime
//! layout as a worker (tokio current-thread + `LocalSet`) and the same parser (httparse), with
//! nothing else: no hyper, no header maps, no routing, metrics or logs. One upstream connection
//! per client connection; the request head is rewritten as the router does (`connection`
//! dropped, `x-forwarded-proto` and `x-request-id` added), the response head and a
//! content-length body are copied as bytes.
//!
//! It is a yardstick, not a proxy (requests without bodies, responses with a content-length, no
//! limits, no errors answered): it says what a request costs on tokio before any of the work an
//! HTTP/1.1 server codec of our own would keep. Counted like the proxy (BENCHMARKS.md):
//!
//! ```sh
//! cargo build --profile production -p waystone-proxy --example bare_forwarder
//! python3 scripts/callgrind-proxy.py bare 1000
//! ```
//!
//! Usage: `bare_forwarder LISTEN_PORT UPSTREAM_PORT` (both on 127.0.0.1).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEADERS: usize = 64;

/// Reads from `io` into `buf` until `parse` finds a complete head; `None` at end of stream or
/// on a malformed head.
async fn read_head<T>(
    io: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> httparse::Result<T>,
) -> std::io::Result<Option<T>> {
    loop {
        match parse(buf) {
            Ok(httparse::Status::Complete(v)) => return Ok(Some(v)),
            Ok(httparse::Status::Partial) => {
                if io.read_buf(buf).await? == 0 {
                    return Ok(None);
                }
            }
            Err(_) => return Ok(None),
        }
    }
}

async fn serve(mut client: TcpStream, upstream: std::net::SocketAddr) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut server = TcpStream::connect(upstream).await?;
    server.set_nodelay(true)?;
    let (mut cbuf, mut sbuf) = (Vec::with_capacity(8192), Vec::with_capacity(8192));
    let mut out = Vec::with_capacity(1024);
    let mut id = 0u64;
    loop {
        let head = read_head(&mut client, &mut cbuf, |b| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            Ok(match req.parse(b)? {
                httparse::Status::Complete(n) => {
                    out.clear();
                    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
                    out.extend_from_slice(b" HTTP/1.1\r\n");
                    for h in req.headers.iter() {
                        if !h.name.eq_ignore_ascii_case("connection") {
                            out.extend_from_slice(h.name.as_bytes());
                            out.extend_from_slice(b": ");
                            out.extend_from_slice(h.value);
                            out.extend_from_slice(b"\r\n");
                        }
                    }
                    httparse::Status::Complete(n)
                }
                httparse::Status::Partial => httparse::Status::Partial,
            })
        })
        .await?;
        let Some(len) = head else { return Ok(()) };
        cbuf.drain(..len);
        id += 1;
        out.extend_from_slice(b"x-forwarded-proto: http\r\nx-request-id: ");
        out.extend_from_slice(id.to_string().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        server.write_all(&out).await?;

        let head = read_head(&mut server, &mut sbuf, |b| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            Ok(match resp.parse(b)? {
                httparse::Status::Complete(n) => {
                    let body = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                        .unwrap_or(0usize);
                    httparse::Status::Complete(n + body)
                }
                httparse::Status::Partial => httparse::Status::Partial,
            })
        })
        .await?;
        let Some(total) = head else { return Ok(()) };
        while sbuf.len() < total {
            if server.read_buf(&mut sbuf).await? == 0 {
                return Ok(());
            }
        }
        client.write_all(&sbuf[..total]).await?;
        sbuf.drain(..total);
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut port = || -> std::io::Result<u16> {
        args.next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| std::io::Error::other("usage: bare_forwarder LISTEN_PORT UPSTREAM_PORT"))
    };
    let (listen, upstream) = (port()?, port()?);
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], upstream));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::bind(("127.0.0.1", listen)).await?;
        loop {
            let (socket, _) = listener.accept().await?;
            tokio::task::spawn_local(async move {
                let _ = serve(socket, upstream).await;
            });
        }
    })
}
