//! One HTTP/1.1 exchange on a fresh connection, with body and trailers.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::corpus::Request;
use super::echo::read_message;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Lowercase names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

pub fn send(addr: &str, req: &Request) -> Result<Response, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = format!(
        "{} {} HTTP/1.1\r\nhost: diff.test\r\nconnection: close\r\n",
        req.method, req.path
    );
    for (k, v) in &req.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = req.body.as_deref().unwrap_or("");
    if !req.trailers.is_empty() {
        out.push_str("transfer-encoding: chunked\r\n\r\n");
        if !body.is_empty() {
            out.push_str(&format!("{:x}\r\n{body}\r\n", body.len()));
        }
        out.push_str("0\r\n");
        for (k, v) in &req.trailers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
    } else if req.body.is_some() {
        out.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    } else {
        out.push_str("\r\n");
    }
    s.write_all(out.as_bytes())
        .map_err(|e| format!("write to {addr}: {e}"))?;
    let mut r = BufReader::new(s);
    let m = read_message(&mut r, true)
        .map_err(|e| format!("read from {addr}: {e}"))?
        .ok_or_else(|| format!("{addr} closed without a response"))?;
    let status = m
        .start
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {:?}", m.start))?;
    Ok(Response {
        status,
        headers: m.headers,
        body: m.body,
        trailers: m.trailers,
    })
}
