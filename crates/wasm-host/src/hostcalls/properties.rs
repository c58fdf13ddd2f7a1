//! `proxy_get_property`: Envoy's attribute vocabulary over the plain data the host has.
//! Strings are returned as raw bytes, integers and times as 8-byte little-endian.

use std::net::SocketAddr;
use std::time::UNIX_EPOCH;

use crate::state::HostState;
use crate::types::HeaderMap;

use super::serialize_map;

/// Splits a property path into segments. Paths are NUL-separated (`request\0path`); a path
/// without NUL is also accepted in dotted form (`request.path`) since some SDKs send that.
fn segments(path: &[u8]) -> Vec<&[u8]> {
    let path = path.strip_suffix(b"\0").unwrap_or(path);
    if path.contains(&0) {
        return path.split(|b| *b == 0).collect();
    }
    // Dotted form: only the first two dots separate segments so header names keep theirs.
    let mut parts = Vec::new();
    let mut rest = path;
    for _ in 0..2 {
        match rest.iter().position(|b| *b == b'.') {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 1..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn header(map: &HeaderMap, name: &str) -> Option<Vec<u8>> {
    map.get(name).map(<[u8]>::to_vec)
}

fn headers_or_one(map: &HeaderMap, rest: &[&[u8]]) -> Option<Vec<u8>> {
    match rest {
        [] => Some(serialize_map(
            map.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        )),
        [name] => header(map, &String::from_utf8_lossy(name)),
        _ => None,
    }
}

fn address(a: Option<SocketAddr>, what: &[u8]) -> Option<Vec<u8>> {
    let a = a?;
    match what {
        b"address" => Some(a.to_string().into_bytes()),
        b"port" => Some(int(i64::from(a.port()))),
        _ => None,
    }
}

fn non_empty(s: &str) -> Option<Vec<u8>> {
    (!s.is_empty()).then(|| s.as_bytes().to_vec())
}

pub(crate) fn get_property(state: &HostState, path: &[u8]) -> Option<Vec<u8>> {
    if let Some(v) = builtin(state, &segments(path)) {
        return Some(v);
    }
    let trimmed = path.strip_suffix(b"\0").unwrap_or(path);
    let extra = state
        .stream
        .as_ref()
        .map(|s| &s.properties.extra)
        .unwrap_or(&state.root_properties);
    extra
        .get(path)
        .or_else(|| extra.get(trimmed))
        .or_else(|| state.root_properties.get(trimmed))
        .cloned()
}

fn builtin(state: &HostState, seg: &[&[u8]]) -> Option<Vec<u8>> {
    let spec = &state.spec;
    match seg {
        [b"plugin_name"] => return Some(spec.name.as_bytes().to_vec()),
        [b"plugin_root_id"] => return Some(spec.root_id.as_bytes().to_vec()),
        [b"plugin_vm_id"] => return Some(spec.vm_id.as_bytes().to_vec()),
        _ => {}
    }
    let stream = state.stream.as_ref()?;
    let props = &stream.properties;
    let req = &stream.request_headers;
    match seg {
        [b"request", b"path"] => header(req, ":path"),
        [b"request", b"url_path"] => req.get(":path").map(|p| {
            let end = p.iter().position(|b| *b == b'?').unwrap_or(p.len());
            p[..end].to_vec()
        }),
        [b"request", b"host"] => header(req, ":authority").or_else(|| header(req, "host")),
        [b"request", b"scheme"] => header(req, ":scheme"),
        [b"request", b"method"] => header(req, ":method"),
        [b"request", b"referer"] => header(req, "referer"),
        [b"request", b"useragent"] => header(req, "user-agent"),
        [b"request", b"id"] => props
            .request_id
            .as_ref()
            .map(|s| s.as_bytes().to_vec())
            .or_else(|| header(req, "x-request-id")),
        [b"request", b"protocol"] => non_empty(&props.protocol),
        [b"request", b"time"] => props
            .start_time
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| int(d.as_nanos() as i64)),
        [b"request", b"headers", rest @ ..] => headers_or_one(req, rest),
        [b"response", b"code"] => props
            .response_code
            .map(i64::from)
            .or_else(|| {
                let status = stream.response_headers.get(":status")?;
                std::str::from_utf8(status).ok()?.parse().ok()
            })
            .map(int),
        [b"response", b"headers", rest @ ..] => headers_or_one(&stream.response_headers, rest),
        [b"response", b"trailers", rest @ ..] => headers_or_one(&stream.response_trailers, rest),
        // Envoy serializes booleans as one byte.
        [b"connection", b"mtls"] => Some(vec![u8::from(props.mtls.is_some())]),
        [b"connection", b"tls_version"] => {
            props.mtls.as_ref().and_then(|m| non_empty(&m.tls_version))
        }
        [b"source", b"principal"] | [b"connection", b"uri_san_peer_certificate"] => props
            .mtls
            .as_ref()
            .and_then(|m| non_empty(&m.peer_principal)),
        [b"destination", b"principal"] | [b"connection", b"uri_san_local_certificate"] => props
            .mtls
            .as_ref()
            .and_then(|m| non_empty(&m.local_principal)),
        [b"source", what] => address(props.source, what),
        [b"destination", what] => address(props.destination, what),
        [b"connection", b"id"] => Some(props.connection_id.to_le_bytes().to_vec()),
        [b"node", b"id"] => non_empty(&props.node_id),
        [b"cluster_name"] => non_empty(&props.cluster_name),
        [b"route_name"] => non_empty(&props.route_name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_forms() {
        assert_eq!(segments(b"request\0path"), vec![&b"request"[..], b"path"]);
        assert_eq!(segments(b"request\0path\0"), vec![&b"request"[..], b"path"]);
        assert_eq!(segments(b"request.path"), vec![&b"request"[..], b"path"]);
        assert_eq!(
            segments(b"request.headers.x.y"),
            vec![&b"request"[..], b"headers", b"x.y"]
        );
        assert_eq!(segments(b"plugin_name"), vec![&b"plugin_name"[..]]);
    }
}
