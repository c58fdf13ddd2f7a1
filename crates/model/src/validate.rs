//! Admission checks, as Istio's webhook and the CRDs' own rules make them.

use std::collections::BTreeSet;

use base64::Engine as _;

use crate::object::Resource;
use crate::resources::*;

/// One object failed admission. Lists every problem found, each with its field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {}", issues.iter().map(|i| format!("{}: {}", i.field, i.message)).collect::<Vec<_>>().join("; "))]
pub struct ValidationError {
    pub kind: &'static str,
    /// `namespace/name` (just `name` when cluster-scoped or the namespace is not set yet).
    pub object: String,
    pub issues: Vec<FieldIssue>,
}

/// One failed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldIssue {
    /// e.g. `spec.targetRefs[1].namespace`.
    pub field: String,
    pub message: String,
}

#[derive(Default)]
struct Issues(Vec<FieldIssue>);

impl Issues {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldIssue {
            field: field.into(),
            message: message.into(),
        });
    }
}

const MAX_LUA_BYTES: usize = 64 * 1024;

pub(crate) fn validate(res: &Resource) -> Result<(), ValidationError> {
    let mut issues = Issues::default();
    let meta = res.meta();
    let info = res.kind_info();
    // Namespaces and Services become DNS labels; everything else only needs a subdomain.
    let label_named = matches!(res, Resource::Namespace(_) | Resource::Service(_));
    if meta.name.is_empty() {
        issues.add("metadata.name", "required");
    } else if let Err(why) = if label_named {
        check_dns_label(&meta.name)
    } else {
        check_dns_subdomain(&meta.name)
    } {
        issues.add("metadata.name", why);
    }
    if let Some(ns) = &meta.namespace
        && info.namespaced
        && let Err(why) = check_dns_label(ns)
    {
        issues.add("metadata.namespace", why);
    }
    for key in meta.labels.keys() {
        if let Err(why) = check_label_key(key) {
            issues.add(format!("metadata.labels[{key}]"), why);
        }
    }
    for (key, value) in &meta.labels {
        if let Err(why) = check_label_value(value) {
            issues.add(format!("metadata.labels[{key}]"), why);
        }
    }
    match res {
        Resource::Namespace(_) | Resource::GatewayClass(_) => {}
        Resource::Service(s) => validate_service(s, &mut issues),
        Resource::EndpointSlice(e) => validate_endpoint_slice(e, &mut issues),
        Resource::Gateway(g) => validate_gateway(g, &mut issues),
        Resource::HttpRoute(r) => validate_http_route(r, &mut issues),
        Resource::TcpRoute(r) => validate_tcp_route(r, &mut issues),
        Resource::WasmPlugin(p) => validate_wasm_plugin(p, &mut issues),
        Resource::TrafficExtension(t) => validate_traffic_extension(t, &mut issues),
        Resource::Secret(s) => validate_secret(s, &mut issues),
    }
    if issues.0.is_empty() {
        Ok(())
    } else {
        Err(ValidationError {
            kind: info.kind,
            object: res.display_name(),
            issues: issues.0,
        })
    }
}

pub(crate) fn check_dns_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{s}\" must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ))
    }
}

pub(crate) fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    let ok = !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{s}\" must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)"
        ))
    }
}

fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && check_dns_subdomain(p).is_err()
    {
        return Err(format!(
            "label key prefix \"{p}\" must be a DNS-1123 subdomain"
        ));
    }
    if is_label_name(name) {
        Ok(())
    } else {
        Err(format!("label key \"{key}\" is not a valid label name"))
    }
}

fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(format!(
            "label value \"{value}\" must be at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ))
    }
}

fn check_port(port: i64) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("port {port} must be between 1 and 65535"))
    }
}

fn validate_service(s: &Service, issues: &mut Issues) {
    let mut names = BTreeSet::new();
    for (i, p) in s.spec.ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        if let Err(why) = check_port(p.port) {
            issues.add(format!("{f}.port"), why);
        }
        match &p.target_port {
            Some(IntOrString::Int(n)) => {
                if let Err(why) = check_port(*n) {
                    issues.add(format!("{f}.targetPort"), why);
                }
            }
            Some(IntOrString::String(n)) if n.is_empty() || n.len() > 15 => {
                issues.add(
                    format!("{f}.targetPort"),
                    "a named port must be 1 to 15 characters",
                );
            }
            _ => {}
        }
        let name = p.name.clone().unwrap_or_default();
        if s.spec.ports.len() > 1 && name.is_empty() {
            issues.add(
                format!("{f}.name"),
                "required when the service has more than one port",
            );
        }
        if !names.insert(name.clone()) {
            issues.add(
                format!("{f}.name"),
                format!("duplicate port name \"{name}\""),
            );
        }
    }
}

fn validate_endpoint_slice(e: &EndpointSlice, issues: &mut Issues) {
    if !matches!(e.address_type.as_str(), "IPv4" | "IPv6" | "FQDN") {
        issues.add(
            "addressType",
            format!("\"{}\" must be one of IPv4, IPv6, FQDN", e.address_type),
        );
    }
    for (i, p) in e.ports.iter().enumerate() {
        if let Some(n) = p.port
            && let Err(why) = check_port(n)
        {
            issues.add(format!("ports[{i}].port"), why);
        }
    }
    for (i, ep) in e.endpoints.iter().enumerate() {
        if ep.addresses.is_empty() {
            issues.add(
                format!("endpoints[{i}].addresses"),
                "at least one address is required",
            );
        }
        if e.address_type != "FQDN" {
            for (j, a) in ep.addresses.iter().enumerate() {
                let parsed = a.parse::<std::net::IpAddr>();
                let ok = match (e.address_type.as_str(), parsed) {
                    ("IPv4", Ok(ip)) => ip.is_ipv4(),
                    ("IPv6", Ok(ip)) => ip.is_ipv6(),
                    _ => false,
                };
                if !ok {
                    issues.add(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("\"{a}\" is not an {} address", e.address_type),
                    );
                }
            }
        }
    }
}

fn validate_gateway(g: &Gateway, issues: &mut Issues) {
    if g.spec.gateway_class_name.is_empty() {
        issues.add("spec.gatewayClassName", "required");
    }
    if g.spec.listeners.is_empty() {
        issues.add("spec.listeners", "at least one listener is required");
    }
    if g.spec.listeners.len() > 64 {
        issues.add("spec.listeners", "at most 64 listeners");
    }
    let mut names = BTreeSet::new();
    for (i, l) in g.spec.listeners.iter().enumerate() {
        let f = format!("spec.listeners[{i}]");
        if let Err(why) = check_dns_label(&l.name) {
            issues.add(format!("{f}.name"), why);
        }
        if !names.insert(l.name.as_str()) {
            issues.add(
                format!("{f}.name"),
                format!("duplicate listener name \"{}\"", l.name),
            );
        }
        if let Err(why) = check_port(l.port) {
            issues.add(format!("{f}.port"), why);
        }
        if l.protocol.is_empty() {
            issues.add(format!("{f}.protocol"), "required");
        }
        if let Some(h) = &l.hostname
            && let Err(why) = check_hostname(h)
        {
            issues.add(format!("{f}.hostname"), why);
        }
        if let Some(ns) = l
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.as_ref())
            && let Some(from) = &ns.from
            && !matches!(from.as_str(), "All" | "Same" | "Selector")
        {
            issues.add(
                format!("{f}.allowedRoutes.namespaces.from"),
                format!("\"{from}\" must be one of All, Same, Selector"),
            );
        }
    }
}

/// Gateway API hostnames: DNS names, optionally with a leading `*.` label; no IPs.
fn check_hostname(h: &str) -> Result<(), String> {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    if h.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("hostname \"{h}\" must not be an IP address"));
    }
    check_dns_subdomain(rest).map_err(|_| {
        format!(
            "hostname \"{h}\" must be a DNS name, optionally starting with a \"*.\" wildcard label"
        )
    })
}

/// A route's parentRefs, as the route CRDs constrain them.
fn check_parent_refs(refs: &[ParentReference], issues: &mut Issues) {
    if refs.len() > 32 {
        issues.add("spec.parentRefs", "at most 32 parent references");
    }
    for (i, p) in refs.iter().enumerate() {
        if p.name.is_empty() {
            issues.add(format!("spec.parentRefs[{i}].name"), "required");
        }
        if let Some(port) = p.port
            && let Err(why) = check_port(port)
        {
            issues.add(format!("spec.parentRefs[{i}].port"), why);
        }
    }
}

/// One backendRef of any route kind (at `f`): a valid port, required for a Service, and a
/// weight in the CRD's range.
fn check_backend_ref<F: BackendFilters>(b: &BackendRefOf<F>, f: &str, issues: &mut Issues) {
    let kind = b.kind.as_deref().unwrap_or("Service");
    let group = b.group.as_deref().unwrap_or("");
    match b.port {
        Some(port) => {
            if let Err(why) = check_port(port) {
                issues.add(format!("{f}.port"), why);
            }
        }
        None if kind == "Service" && (group.is_empty() || group == "core") => {
            issues.add(format!("{f}.port"), "required when referring to a Service");
        }
        None => {}
    }
    if let Some(w) = b.weight
        && !(0..=1_000_000).contains(&w)
    {
        issues.add(
            format!("{f}.weight"),
            format!("{w} must be between 0 and 1000000"),
        );
    }
}

/// The CRD's rules: 1-16 rules, each with 1-16 backends; a Service backend needs a port.
fn validate_tcp_route(r: &TcpRoute, issues: &mut Issues) {
    check_parent_refs(&r.spec.parent_refs, issues);
    if r.spec.rules.is_empty() {
        issues.add("spec.rules", "at least one rule is required");
    }
    if r.spec.rules.len() > 16 {
        issues.add("spec.rules", "at most 16 rules");
    }
    for (i, rule) in r.spec.rules.iter().enumerate() {
        if rule.backend_refs.is_empty() || rule.backend_refs.len() > 16 {
            issues.add(
                format!("spec.rules[{i}].backendRefs"),
                "between 1 and 16 backends are required",
            );
        }
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let f = format!("spec.rules[{i}].backendRefs[{j}]");
            if b.name.is_empty() {
                issues.add(format!("{f}.name"), "required");
            }
            check_backend_ref(b, &f, issues);
        }
    }
}

fn validate_http_route(r: &HttpRoute, issues: &mut Issues) {
    check_parent_refs(&r.spec.parent_refs, issues);
    if r.spec.hostnames.len() > 16 {
        issues.add("spec.hostnames", "at most 16 hostnames");
    }
    for (i, h) in r.spec.hostnames.iter().enumerate() {
        if let Err(why) = check_hostname(h) {
            issues.add(format!("spec.hostnames[{i}]"), why);
        }
    }
    if r.spec.rules.len() > 16 {
        issues.add("spec.rules", "at most 16 rules");
    }
    for (i, rule) in r.spec.rules.iter().enumerate() {
        for (j, m) in rule.matches.iter().enumerate() {
            let f = format!("spec.rules[{i}].matches[{j}]");
            if let Some(path) = &m.path {
                let value = path.value.as_deref().unwrap_or("/");
                let ty = path.type_.unwrap_or(PathMatchType::PathPrefix);
                if ty != PathMatchType::RegularExpression && !value.starts_with('/') {
                    issues.add(
                        format!("{f}.path.value"),
                        format!("\"{value}\" must start with '/'"),
                    );
                }
            }
            for (k, h) in m.headers.iter().enumerate() {
                if h.name.is_empty() {
                    issues.add(format!("{f}.headers[{k}].name"), "required");
                }
            }
            if let Some(method) = &m.method
                && !matches!(
                    method.as_str(),
                    "GET"
                        | "HEAD"
                        | "POST"
                        | "PUT"
                        | "DELETE"
                        | "CONNECT"
                        | "OPTIONS"
                        | "TRACE"
                        | "PATCH"
                )
            {
                issues.add(
                    format!("{f}.method"),
                    format!("\"{method}\" is not an HTTP method"),
                );
            }
        }
        for (j, b) in rule.backend_refs.iter().enumerate() {
            check_backend_ref(b, &format!("spec.rules[{i}].backendRefs[{j}]"), issues);
        }
    }
}

fn validate_secret(s: &Secret, issues: &mut Issues) {
    for (k, v) in &s.data {
        if base64::engine::general_purpose::STANDARD.decode(v).is_err() {
            issues.add(format!("data[{k}]"), "is not valid base64");
        }
    }
    if s.type_.as_deref() == Some("kubernetes.io/dockerconfigjson")
        && !s.data.contains_key(".dockerconfigjson")
        && !s.string_data.contains_key(".dockerconfigjson")
    {
        issues.add(
            "data[.dockerconfigjson]",
            "required for type kubernetes.io/dockerconfigjson",
        );
    }
}

/// The fields WasmPlugin and `TrafficExtension.spec.wasm` share.
pub(crate) struct ModuleFields<'a> {
    pub url: &'a str,
    pub sha256: Option<&'a str>,
    pub image_pull_secret: Option<&'a str>,
    pub plugin_name: Option<&'a str>,
    pub vm_config: Option<&'a VmConfig>,
}

fn validate_module(prefix: &str, m: &ModuleFields<'_>, issues: &mut Issues) {
    if m.url.is_empty() {
        issues.add(format!("{prefix}url"), "required");
    } else {
        if let Some((scheme, _)) = m.url.split_once("://")
            && !matches!(scheme, "oci" | "http" | "https" | "file")
        {
            issues.add(
                format!("{prefix}url"),
                format!("scheme \"{scheme}\" must be one of oci, http, https, file"),
            );
        }
        if let Some(digest) = url_digest(m.url) {
            if !is_sha256_hex(digest) {
                issues.add(
                    format!("{prefix}url"),
                    "the @sha256: digest must be 64 hex characters",
                );
            } else if let Some(sha) = m.sha256
                && !sha.is_empty()
                && !sha.eq_ignore_ascii_case(digest)
            {
                issues.add(
                    format!("{prefix}sha256"),
                    format!("\"{sha}\" does not match the digest in the url (sha256:{digest})"),
                );
            }
        }
    }
    if let Some(sha) = m.sha256
        && !sha.is_empty()
        && !is_sha256_hex(sha)
    {
        issues.add(format!("{prefix}sha256"), "must be 64 hex characters");
    }
    if let Some(secret) = m.image_pull_secret
        && let Err(why) = check_dns_subdomain(secret)
    {
        issues.add(format!("{prefix}imagePullSecret"), why);
    }
    if let Some(name) = m.plugin_name
        && (name.is_empty() || name.len() > 256)
    {
        issues.add(format!("{prefix}pluginName"), "must be 1 to 256 characters");
    }
    if let Some(vm) = m.vm_config {
        if vm.env.len() > 256 {
            issues.add(format!("{prefix}vmConfig.env"), "at most 256 variables");
        }
        let mut names = BTreeSet::new();
        for (i, e) in vm.env.iter().enumerate() {
            let f = format!("{prefix}vmConfig.env[{i}]");
            if e.name.is_empty() {
                issues.add(format!("{f}.name"), "required");
            }
            if !names.insert(e.name.as_str()) {
                issues.add(
                    format!("{f}.name"),
                    format!("duplicate variable \"{}\"", e.name),
                );
            }
            if e.value_from == Some(EnvValueSource::Host) && e.value.is_some() {
                issues.add(
                    format!("{f}.value"),
                    "value may only be set when valueFrom is INLINE",
                );
            }
            if e.value.as_ref().is_some_and(|v| v.len() > 2048) {
                issues.add(format!("{f}.value"), "at most 2048 characters");
            }
        }
    }
}

/// The hex digest after `@sha256:` in a module url, if any.
pub(crate) fn url_digest(url: &str) -> Option<&str> {
    url.rsplit_once("@sha256:").map(|(_, d)| d)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn validate_selector(sel: &Option<WorkloadSelector>, issues: &mut Issues) {
    if let Some(sel) = sel {
        for (k, v) in &sel.match_labels {
            let f = format!("spec.selector.matchLabels[{k}]");
            if k.is_empty() {
                issues.add(f.clone(), "key must not be empty");
            }
            if k.contains('*') {
                issues.add(f.clone(), "wildcard not allowed in label key match");
            }
            if v.contains('*') {
                issues.add(f.clone(), "wildcard not allowed in label value match");
            }
        }
    }
}

fn validate_target_ref(field: &str, r: &PolicyTargetReference, issues: &mut Issues) {
    let allowed: &[(&str, &[&str])] = &[
        ("Gateway", &["gateway.networking.k8s.io"]),
        ("GatewayClass", &["gateway.networking.k8s.io"]),
        ("Service", &["", "core"]),
        ("ServiceEntry", &["networking.istio.io"]),
    ];
    match allowed.iter().find(|(k, _)| *k == r.kind) {
        None => issues.add(
            format!("{field}.kind"),
            format!(
                "\"{}\" is not supported; use one of Gateway, GatewayClass, Service, ServiceEntry",
                r.kind
            ),
        ),
        Some((kind, groups)) if !groups.contains(&r.group.as_str()) => issues.add(
            format!("{field}.group"),
            format!(
                "\"{}\" is not the group of {kind} (expected {})",
                r.group,
                groups
                    .iter()
                    .map(|g| format!("\"{g}\""))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        ),
        Some(_) => {}
    }
    if r.name.is_empty() {
        issues.add(format!("{field}.name"), "required");
    }
    if !r.namespace.is_empty() {
        issues.add(
            format!("{field}.namespace"),
            "cross namespace referencing is not currently supported",
        );
    }
}

fn validate_match(selectors: &[TrafficSelector], issues: &mut Issues) {
    for (i, m) in selectors.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for (j, p) in m.ports.iter().enumerate() {
            let f = format!("spec.match[{i}].ports[{j}].number");
            if let Err(why) = check_port(p.number) {
                issues.add(f.clone(), why);
            }
            if !seen.insert(p.number) {
                issues.add(f, format!("duplicate port {}", p.number));
            }
        }
    }
}

fn validate_priority(priority: Option<i64>, issues: &mut Issues) {
    if let Some(p) = priority
        && i32::try_from(p).is_err()
    {
        issues.add("spec.priority", format!("{p} is out of the int32 range"));
    }
}

fn validate_wasm_plugin(p: &WasmPlugin, issues: &mut Issues) {
    let s = &p.spec;
    let set = [
        s.selector.is_some(),
        s.target_ref.is_some(),
        !s.target_refs.is_empty(),
    ];
    if set.iter().filter(|b| **b).count() > 1 {
        issues.add(
            "spec",
            "only one of selector, targetRef or targetRefs can be set",
        );
    }
    validate_selector(&s.selector, issues);
    if let Some(r) = &s.target_ref {
        validate_target_ref("spec.targetRef", r, issues);
    }
    if s.target_refs.len() > 16 {
        issues.add("spec.targetRefs", "at most 16 target references");
    }
    for (i, r) in s.target_refs.iter().enumerate() {
        validate_target_ref(&format!("spec.targetRefs[{i}]"), r, issues);
    }
    validate_module(
        "spec.",
        &ModuleFields {
            url: &s.url,
            sha256: s.sha256.as_deref(),
            image_pull_secret: s.image_pull_secret.as_deref(),
            plugin_name: s.plugin_name.as_deref(),
            vm_config: s.vm_config.as_ref(),
        },
        issues,
    );
    validate_priority(s.priority, issues);
    validate_match(&s.match_, issues);
}

fn validate_traffic_extension(t: &TrafficExtension, issues: &mut Issues) {
    let s = &t.spec;
    if s.selector.is_some() && !s.target_refs.is_empty() {
        issues.add("spec", "only one of targetRefs or selector can be set");
    }
    validate_selector(&s.selector, issues);
    if s.target_refs.len() > 16 {
        issues.add("spec.targetRefs", "at most 16 target references");
    }
    for (i, r) in s.target_refs.iter().enumerate() {
        validate_target_ref(&format!("spec.targetRefs[{i}]"), r, issues);
    }
    validate_priority(s.priority, issues);
    validate_match(&s.match_, issues);
    match (&s.wasm, &s.lua) {
        (Some(_), Some(_)) | (None, None) => {
            issues.add("spec", "exactly one of wasm or lua must be set")
        }
        (Some(w), None) => validate_module(
            "spec.wasm.",
            &ModuleFields {
                url: &w.url,
                sha256: w.sha256.as_deref(),
                image_pull_secret: w.image_pull_secret.as_deref(),
                plugin_name: w.plugin_name.as_deref(),
                vm_config: w.vm_config.as_ref(),
            },
            issues,
        ),
        (None, Some(l)) => {
            if l.inline_code.is_empty() {
                issues.add("spec.lua.inlineCode", "required");
            } else if l.inline_code.len() > MAX_LUA_BYTES {
                issues.add(
                    "spec.lua.inlineCode",
                    format!(
                        "{} bytes is more than the limit of 65536",
                        l.inline_code.len()
                    ),
                );
            }
        }
    }
}

impl Resource {
    /// Admission checks (Istio-webhook-like). The error names the object and each bad field.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate(self)
    }
}
