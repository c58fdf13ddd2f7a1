//! The loopback backend both proxies forward to: it answers every request
//! with what it received, so a plugin's changes to the request show in the
//! response body. Request headers each proxy adds by itself (listed in
//! tests/differential/harness.yaml) are left out of the echo.
//!
//! Controls, by request header: `x-echo-status: N` sets the status,
//! `x-echo-resp-<name>: v` adds response header `<name>: v`, and
//! `x-echo-trailer: k=v` answers chunked with that trailer.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

pub struct Echo {
    pub addr: SocketAddr,
}

impl Echo {
    pub fn start(ip: &str, ignored: Vec<String>) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind echo backend");
        let addr = listener.local_addr().unwrap();
        let ignored = Arc::new(ignored);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let ignored = ignored.clone();
                std::thread::spawn(move || serve(conn, &ignored));
            }
        });
        Self { addr }
    }
}

/// One parsed HTTP/1.1 message head plus its body and trailers.
pub struct Message {
    pub start: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn read_line(r: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
}

fn read_fields(r: &mut impl BufRead) -> std::io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    while let Some(line) = read_line(r)? {
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok(out)
}

/// Reads one message; `None` at a clean end of the connection. `bodiless` is
/// for responses to HEAD and statuses that carry no body.
pub fn read_message(r: &mut impl BufRead, response: bool) -> std::io::Result<Option<Message>> {
    let Some(start) = read_line(r)? else {
        return Ok(None);
    };
    let headers = read_fields(r)?;
    let mut body = Vec::new();
    let mut trailers = Vec::new();
    let status: u16 = if response {
        start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    } else {
        0
    };
    let bodiless = response && (status == 204 || status == 304 || (100..200).contains(&status));
    if bodiless {
    } else if header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let line = read_line(r)?.unwrap_or_default();
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("0").trim(), 16)
                .unwrap_or(0);
            if size == 0 {
                trailers = read_fields(r)?;
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = header(&headers, "content-length").and_then(|v| v.parse().ok()) {
        body = vec![0; n];
        r.read_exact(&mut body)?;
    } else if response {
        r.read_to_end(&mut body)?;
    }
    Ok(Some(Message {
        start,
        headers,
        body,
        trailers,
    }))
}

fn serve(conn: TcpStream, ignored: &[String]) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    while let Ok(Some(req)) = read_message(&mut r, false) {
        let mut parts = req.start.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let mut echoed: Vec<&(String, String)> = req
            .headers
            .iter()
            .filter(|(k, _)| !ignored.iter().any(|i| i == k))
            .collect();
        echoed.sort();
        let mut body = format!("{method} {target}\n");
        for (k, v) in echoed {
            body.push_str(&format!("{k}: {v}\n"));
        }
        for (k, v) in &req.trailers {
            body.push_str(&format!("trailer {k}: {v}\n"));
        }
        body.push('\n');
        let mut body = body.into_bytes();
        body.extend_from_slice(&req.body);

        let status = header(&req.headers, "x-echo-status").unwrap_or("200");
        let mut head = format!(
            "HTTP/1.1 {status} Echo\r\ncontent-type: text/plain\r\nx-echo-method: {method}\r\n"
        );
        for (k, v) in &req.headers {
            if let Some(name) = k.strip_prefix("x-echo-resp-") {
                head.push_str(&format!("{name}: {v}\r\n"));
            }
        }
        let trailer = header(&req.headers, "x-echo-trailer").and_then(|t| t.split_once('='));
        let out = match trailer {
            Some((tk, tv)) => {
                head.push_str("transfer-encoding: chunked\r\n\r\n");
                let mut out = head.into_bytes();
                out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                out.extend_from_slice(&body);
                out.extend_from_slice(format!("\r\n0\r\n{tk}: {tv}\r\n\r\n").as_bytes());
                out
            }
            None => {
                head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
                let mut out = head.into_bytes();
                out.extend_from_slice(&body);
                out
            }
        };
        if w.write_all(&out).is_err() {
            return;
        }
    }
}
