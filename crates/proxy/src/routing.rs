//! Pure routing decisions: which route, which service, which endpoint.

use std::cell::Cell;
use std::net::SocketAddr;

use waystone_model::snapshot::{
    Backend, HeaderMatch, ListenerConfig, PathMatch, RouteConfig, RouteMatch, ServiceConfig,
    ServicePortConfig, Snapshot,
};

/// The parts of a request that routing looks at.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Raw path including the query string.
    pub path: &'a str,
    /// `:authority` without its port.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// Splits `host[:port]` (IPv6 in brackets) into host and optional port.
pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            let host = &rest[..end];
            let port = rest[end + 1..]
                .strip_prefix(':')
                .and_then(|p| p.parse().ok());
            return (host, port);
        }
        return (authority, None);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// Finds the first route of `listener` matching the request (routes are in
/// Gateway API precedence order already).
pub fn match_route<'a>(
    listener: &'a ListenerConfig,
    req: &RequestView<'_>,
) -> Option<&'a RouteConfig> {
    listener
        .routes
        .iter()
        .find(|r| host_matches(&r.hostnames, req.host) && matches_any(&r.matches, req))
}

fn host_matches(hostnames: &[String], host: &str) -> bool {
    if hostnames.is_empty() {
        return true;
    }
    hostnames.iter().any(|h| {
        if let Some(suffix) = h.strip_prefix("*.") {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        } else {
            h.eq_ignore_ascii_case(host)
        }
    })
}

fn matches_any(matches: &[RouteMatch], req: &RequestView<'_>) -> bool {
    if matches.is_empty() {
        return true;
    }
    matches.iter().any(|m| route_match(m, req))
}

fn route_match(m: &RouteMatch, req: &RequestView<'_>) -> bool {
    let (path, query) = match req.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.path, None),
    };
    if let Some(pm) = &m.path {
        let ok = match pm {
            PathMatch::Exact(v) => path == v,
            PathMatch::Prefix(v) => prefix_match(path, v),
            PathMatch::Regex(v) => full_regex(v, path),
        };
        if !ok {
            return false;
        }
    }
    if let Some(method) = &m.method
        && !method.eq_ignore_ascii_case(req.method)
    {
        return false;
    }
    for hm in &m.headers {
        let values: Vec<&str> = req
            .headers
            .get_all(hm.name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !values.iter().any(|v| value_matches(hm, v)) {
            return false;
        }
    }
    for qm in &m.query_params {
        let found = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .any(|(k, v)| k == qm.name && value_matches(qm, v));
        if !found {
            return false;
        }
    }
    true
}

fn value_matches(m: &HeaderMatch, value: &str) -> bool {
    if m.regex {
        full_regex(&m.value, value)
    } else {
        m.value == value
    }
}

thread_local! {
    /// Compiled route regexes of this worker; routes change rarely, requests often.
    static REGEXES: std::cell::RefCell<std::collections::HashMap<String, Option<regex::Regex>>> =
        Default::default();
}

/// Whole-value match; an invalid pattern matches nothing.
fn full_regex(pattern: &str, value: &str) -> bool {
    REGEXES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(compiled) = cache.get(pattern) {
            return compiled.as_ref().is_some_and(|r| r.is_match(value));
        }
        if cache.len() > 4096 {
            cache.clear();
        }
        cache
            .entry(pattern.to_string())
            .or_insert_with(|| regex::Regex::new(&format!("^(?:{pattern})$")).ok())
            .as_ref()
            .is_some_and(|r| r.is_match(value))
    })
}

/// Gateway API `PathPrefix`: element-wise prefix (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`).
fn prefix_match(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path == prefix || (path.starts_with(prefix) && path.as_bytes()[prefix.len()] == b'/')
}

/// One worker's count of its picks, which spreads successive picks over backends and
/// endpoints. Each worker counts its own, from a random start (as each Envoy worker keeps its
/// own load-balancer state): one counter shared by the workers was an atomic add on a cache
/// line every core writes, twice a request.
struct Picks(Cell<usize>);

impl Picks {
    fn new() -> Self {
        Picks(Cell::new(rand::random()))
    }

    /// The next pick's number.
    fn next(&self) -> usize {
        let n = self.0.get();
        self.0.set(n.wrapping_add(1));
        n
    }
}

thread_local! {
    static BACKEND_PICKS: Picks = Picks::new();
    static ENDPOINT_PICKS: Picks = Picks::new();
}

/// Picks one of `backends` by weight, with this worker's backend count.
pub fn pick_backend_here(backends: &[Backend]) -> Option<&Backend> {
    BACKEND_PICKS.with(|p| pick_backend(backends, p))
}

/// Picks one endpoint of `port` round-robin, with this worker's endpoint count. Backends and
/// endpoints are counted apart: a request that picks both would otherwise take two numbers of
/// one count, and with an even number of endpoints land on every other one only.
pub fn pick_endpoint_here(port: &ServicePortConfig) -> Option<SocketAddr> {
    ENDPOINT_PICKS.with(|p| pick_endpoint(port, p))
}

/// The next number of this worker's endpoint count (callouts spread over an upstream's
/// endpoints with it).
pub fn next_endpoint_pick() -> usize {
    ENDPOINT_PICKS.with(Picks::next)
}

/// Picks one backend by weight (`picks` spreads successive picks).
fn pick_backend<'a>(backends: &'a [Backend], picks: &Picks) -> Option<&'a Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut n = (picks.next() as u64) % total;
    for b in backends {
        let w = u64::from(b.weight);
        if n < w {
            return Some(b);
        }
        n -= w;
    }
    None
}

/// Picks one endpoint round-robin.
fn pick_endpoint(port: &ServicePortConfig, picks: &Picks) -> Option<SocketAddr> {
    if port.endpoints.is_empty() {
        return None;
    }
    let i = picks.next() % port.endpoints.len();
    Some(port.endpoints[i])
}

/// Resolves a mesh destination (`productpage`, `productpage:9080`,
/// `productpage.default`, `productpage.default.svc.cluster.local`, or the
/// service's cluster IP) to a service and one of its ports.
pub fn resolve_service<'a>(
    snapshot: &'a Snapshot,
    authority: &str,
    default_namespace: &str,
) -> Option<(&'a ServiceConfig, &'a ServicePortConfig)> {
    let (host, port) = split_authority(authority);
    let host = host.trim_end_matches('.');
    let service = if host.parse::<std::net::IpAddr>().is_ok() {
        snapshot
            .services
            .iter()
            .find(|s| s.cluster_ip.as_deref() == Some(host))?
    } else {
        let mut parts = host.splitn(3, '.');
        let name = parts.next()?;
        let namespace = parts.next().unwrap_or(default_namespace);
        if let Some(rest) = parts.next()
            && rest != "svc"
            && !rest.starts_with("svc.")
        {
            return None;
        }
        snapshot.service(&waystone_model::snapshot::ObjectKey::new(namespace, name))?
    };
    let port = match port {
        Some(p) => service.ports.iter().find(|sp| sp.port == p)?,
        // No port: 80 when the service has it, else its only (first) port.
        None => service
            .ports
            .iter()
            .find(|sp| sp.port == 80)
            .or_else(|| service.ports.first())?,
    };
    Some((service, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use waystone_model::snapshot::ObjectKey;

    fn svc(ns: &str, name: &str, ip: Option<&str>, ports: &[u16]) -> ServiceConfig {
        ServiceConfig {
            key: ObjectKey::new(ns, name),
            labels: BTreeMap::new(),
            cluster_ip: ip.map(str::to_string),
            ports: ports
                .iter()
                .map(|p| ServicePortConfig {
                    name: None,
                    port: *p,
                    protocol: "TCP".into(),
                    app_protocol: None,
                    endpoints: vec![],
                })
                .collect(),
            waypoint: None,
        }
    }

    fn snapshot() -> Snapshot {
        let mut s = Snapshot::empty();
        s.services = vec![
            svc("default", "productpage", Some("10.0.0.5"), &[9080]),
            svc("default", "reviews", None, &[9080, 80]),
            svc("other", "productpage", None, &[9080]),
        ];
        s.services.sort_by(|a, b| a.key.cmp(&b.key));
        s
    }

    #[test]
    fn authority_forms_resolve_to_the_service() {
        let s = snapshot();
        for a in [
            "productpage",
            "productpage:9080",
            "productpage.default",
            "productpage.default:9080",
            "productpage.default.svc",
            "productpage.default.svc.cluster.local:9080",
            "productpage.default.svc.cluster.local.",
            "10.0.0.5:9080",
        ] {
            let (svc, port) = resolve_service(&s, a, "default").unwrap_or_else(|| panic!("{a}"));
            assert_eq!(svc.key, ObjectKey::new("default", "productpage"), "{a}");
            assert_eq!(port.port, 9080);
        }
        assert_eq!(
            resolve_service(&s, "productpage.other:9080", "default")
                .unwrap()
                .0
                .key
                .namespace,
            "other"
        );
        assert!(resolve_service(&s, "productpage:1234", "default").is_none());
        assert!(resolve_service(&s, "nothing:9080", "default").is_none());
        assert!(resolve_service(&s, "productpage.default.example.com", "default").is_none());
        assert_eq!(
            resolve_service(&s, "reviews", "default").unwrap().1.port,
            80
        );
    }

    #[test]
    fn split_authority_handles_ipv6_and_missing_ports() {
        assert_eq!(split_authority("a:80"), ("a", Some(80)));
        assert_eq!(split_authority("a"), ("a", None));
        assert_eq!(split_authority("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_authority("[::1]"), ("::1", None));
        assert_eq!(split_authority("::1"), ("::1", None));
    }

    #[test]
    fn path_prefix_is_element_wise() {
        assert!(prefix_match("/static", "/static"));
        assert!(prefix_match("/static/a.css", "/static"));
        assert!(prefix_match("/static/a.css", "/static/"));
        assert!(!prefix_match("/staticfoo", "/static"));
        assert!(prefix_match("/anything", "/"));
    }

    fn listener(routes: Vec<RouteConfig>) -> ListenerConfig {
        ListenerConfig {
            name: "http".into(),
            port: 80,
            protocol: "HTTP".into(),
            hostname: None,
            routes,
            chain: vec![],
            tcp_routes: vec![],
        }
    }

    fn route(hostnames: &[&str], matches: Vec<RouteMatch>) -> RouteConfig {
        RouteConfig {
            route: ObjectKey::new("default", "r"),
            rule_index: 0,
            hostnames: hostnames.iter().map(|s| s.to_string()).collect(),
            matches,
            backends: vec![],
        }
    }

    #[test]
    fn route_matching_uses_path_method_headers_query_and_host() {
        let m = RouteMatch {
            path: Some(PathMatch::Exact("/productpage".into())),
            headers: vec![HeaderMatch {
                name: "x-v".into(),
                value: "1".into(),
                regex: false,
            }],
            query_params: vec![HeaderMatch {
                name: "u".into(),
                value: "a.*".into(),
                regex: true,
            }],
            method: Some("GET".into()),
        };
        let l = listener(vec![route(&["*.example.com"], vec![m])]);
        let mut h = http::HeaderMap::new();
        h.insert("x-v", "1".parse().unwrap());
        let req = |method, path, host| RequestView {
            method,
            path,
            host,
            headers: &h,
        };
        assert!(match_route(&l, &req("GET", "/productpage?u=abc", "www.example.com")).is_some());
        assert!(match_route(&l, &req("POST", "/productpage?u=abc", "www.example.com")).is_none());
        assert!(match_route(&l, &req("GET", "/productpage?u=b", "www.example.com")).is_none());
        assert!(match_route(&l, &req("GET", "/productpage?u=abc", "example.com")).is_none());
        assert!(match_route(&l, &req("GET", "/productpage/x?u=abc", "www.example.com")).is_none());
        let empty = http::HeaderMap::new();
        let r = RequestView {
            method: "GET",
            path: "/productpage?u=a",
            host: "a.example.com",
            headers: &empty,
        };
        assert!(match_route(&l, &r).is_none());
    }

    #[test]
    fn weighted_backends_follow_weights() {
        let b = |n: &str, w| Backend {
            service: ObjectKey::new("d", n),
            port: 1,
            weight: w,
        };
        let backends = vec![b("a", 1), b("b", 3), b("c", 0)];
        let c = Picks(Cell::new(0));
        let picks: Vec<_> = (0..8)
            .map(|_| pick_backend(&backends, &c).unwrap().service.name.clone())
            .collect();
        assert_eq!(picks.iter().filter(|n| *n == "a").count(), 2);
        assert_eq!(picks.iter().filter(|n| *n == "b").count(), 6);
        assert!(pick_backend(&[b("z", 0)], &c).is_none());
    }

    #[test]
    fn requests_that_pick_a_backend_still_spread_over_every_endpoint() {
        // Each request picks a backend (one HTTPRoute backend) and then an endpoint of its
        // port: with one count for both, two endpoints would get every other number, the same
        // endpoint each time.
        let backends = vec![Backend {
            service: ObjectKey::new("d", "svc"),
            port: 80,
            weight: 1,
        }];
        let port = ServicePortConfig {
            name: None,
            port: 80,
            protocol: "TCP".into(),
            app_protocol: None,
            endpoints: vec![
                "10.0.0.1:80".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap(),
            ],
        };
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..10 {
            pick_backend_here(&backends).unwrap();
            *seen.entry(pick_endpoint_here(&port).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(seen.values().copied().collect::<Vec<_>>(), vec![5, 5]);
    }
}
