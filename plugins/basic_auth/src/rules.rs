//! The plugin's decisions, free of any Proxy-Wasm host call so they can be
//! tested natively.
//!
//! Behaviour follows Istio's `basic_auth` extension (istio-ecosystem/wasm-extensions):
//! rules are keyed by method, host and path; every matching rule must accept the
//! `authorization` header, which is compared verbatim with base64 credentials.
//!
//! Requests are read as bytes, as Istio's C++ plugin reads them: a header value that is
//! not UTF-8 is compared like any other instead of failing a conversion, and the plugin
//! spends nothing validating text it only compares.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::{Map, Value};

/// Realm announced in `WWW-Authenticate` when the configuration names none.
pub const DEFAULT_REALM: &str = "istio";

const BASIC_PREFIX: &[u8] = b"Basic ";

/// Istio accepts base64 credentials with or without `=` padding.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a plugin configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The configuration bytes are not JSON.
    #[error("basic_auth configuration is not valid JSON: {0}")]
    InvalidJson(String),
    /// The top-level JSON value is not an object.
    #[error("basic_auth configuration must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// `basic_auth_rules` is present but not an array.
    #[error("basic_auth configuration: `basic_auth_rules` must be an array, got {0}")]
    RulesNotArray(&'static str),
    /// A rule is not a JSON object.
    #[error("basic_auth rule {index}: must be a JSON object, got {found}")]
    RuleNotObject { index: usize, found: &'static str },
    /// A rule names none, or more than one, of `prefix`, `exact`, `suffix`.
    #[error(
        "basic_auth rule {index}: exactly one of `prefix`, `exact`, `suffix` is required, found {count}"
    )]
    PathKeyCount { index: usize, count: usize },
    /// A path key holds something other than a string.
    #[error("basic_auth rule {index}: `{key}` must be a string, got {found}")]
    PathNotString {
        index: usize,
        key: &'static str,
        found: &'static str,
    },
    /// `hosts` is present but not an array.
    #[error("basic_auth rule {index}: `hosts` must be an array, got {found}")]
    HostsNotArray { index: usize, found: &'static str },
    /// An entry of `hosts` is not a string.
    #[error("basic_auth rule {index}: `hosts[{entry}]` must be a string, got {found}")]
    HostNotString {
        index: usize,
        entry: usize,
        found: &'static str,
    },
    /// `request_methods` is missing or not an array.
    #[error("basic_auth rule {index}: `request_methods` must be an array of strings, got {found}")]
    MethodsNotArray { index: usize, found: &'static str },
    /// `request_methods` is an empty array.
    #[error("basic_auth rule {index}: `request_methods` must name at least one method")]
    MethodsEmpty { index: usize },
    /// An entry of `request_methods` is not a string.
    #[error("basic_auth rule {index}: `request_methods[{entry}]` must be a string, got {found}")]
    MethodNotString {
        index: usize,
        entry: usize,
        found: &'static str,
    },
    /// `credentials` is missing or not an array.
    #[error("basic_auth rule {index}: `credentials` must be an array of strings, got {found}")]
    CredentialsNotArray { index: usize, found: &'static str },
    /// `credentials` is an empty array.
    #[error("basic_auth rule {index}: `credentials` must hold at least one credential")]
    CredentialsEmpty { index: usize },
    /// An entry of `credentials` is not a string.
    #[error("basic_auth rule {index}: `credentials[{entry}]` must be a string, got {found}")]
    CredentialNotString {
        index: usize,
        entry: usize,
        found: &'static str,
    },
    /// A credential without `:` is not base64 of anything.
    #[error(
        "basic_auth rule {index}: `credentials[{entry}]` has no `:` and is not non-empty base64 \
         (give `user:password` or its base64 encoding)"
    )]
    CredentialUndecodable { index: usize, entry: usize },
    /// `realm` is present but not a string.
    #[error("basic_auth configuration: `realm` must be a string, got {0}")]
    RealmNotString(&'static str),
}

/// How a rule's path is compared with the request's raw `:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Suffix(String),
}

impl PathMatch {
    fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathMatch::Prefix(p) => starts_with(path, p.as_bytes()),
            PathMatch::Exact(p) => same(path, p.as_bytes()),
            PathMatch::Suffix(p) => ends_with(path, p.as_bytes()),
        }
    }
}

/// A `hosts` entry: `*x` matches hosts ending in `x`, `x*` hosts starting with
/// `x`, anything else must be equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Suffix(String),
    Prefix(String),
    Exact(String),
}

impl HostMatch {
    fn parse(pattern: &str) -> HostMatch {
        if let Some(rest) = pattern.strip_prefix('*') {
            HostMatch::Suffix(rest.to_owned())
        } else if let Some(rest) = pattern.strip_suffix('*') {
            HostMatch::Prefix(rest.to_owned())
        } else {
            HostMatch::Exact(pattern.to_owned())
        }
    }

    fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostMatch::Suffix(s) => ends_with(host, s.as_bytes()),
            HostMatch::Prefix(p) => starts_with(host, p.as_bytes()),
            HostMatch::Exact(e) => same(host, e.as_bytes()),
        }
    }
}

/// One entry of `basic_auth_rules`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Empty means every host.
    pub hosts: Vec<HostMatch>,
    pub path: PathMatch,
    pub methods: Vec<String>,
    /// What follows `Basic ` in an accepted `authorization` header.
    pub encoded_credentials: Vec<String>,
}

impl Rule {
    fn applies_to(&self, request: &Request<'_>) -> bool {
        self.methods
            .iter()
            .any(|m| same(m.as_bytes(), request.method))
            && (self.hosts.is_empty() || {
                let host = strip_port(request.authority);
                self.hosts.iter().any(|h| h.matches(host))
            })
            && self.path.matches(request.path)
    }

    fn check(&self, authorization: &[u8]) -> Result<(), DenyReason> {
        if !starts_with(authorization, BASIC_PREFIX) {
            return Err(DenyReason::NoBasicCredentials);
        }
        let presented = &authorization[BASIC_PREFIX.len()..];
        // Visit every stored credential so the time taken does not reveal which
        // one (if any) shares a prefix with the presented value.
        let accepted = self.encoded_credentials.iter().fold(false, |acc, stored| {
            acc | constant_time_eq(stored.as_bytes(), presented)
        });
        if accepted {
            Ok(())
        } else {
            Err(DenyReason::InvalidCredentials)
        }
    }
}

/// Whether `a == b`, taking the same time for every pair of equal-length inputs: the
/// bytes' differences are OR-ed together and only the total is tested, so how far the
/// inputs agree does not show in the time. The length is not hidden (a stored
/// credential's length says little: base64 of `user:password`).
///
/// Eight bytes at a time, with one optimisation barrier per word so the compiler cannot
/// turn the accumulation back into an early exit. The `subtle` crate puts a barrier on
/// every byte: 450 of the 6,000 guest instructions of a request with one stored credential.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let word = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("chunks of 8"));
    let mut diff = 0u64;
    let (a_words, b_words) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_tail, b_tail) = (a_words.remainder(), b_words.remainder());
    for (x, y) in a_words.zip(b_words) {
        diff = core::hint::black_box(diff | (word(x) ^ word(y)));
    }
    for (x, y) in a_tail.iter().zip(b_tail) {
        diff |= u64::from(x ^ y);
    }
    core::hint::black_box(diff) == 0
}

/// The whole plugin configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub rules: Vec<Rule>,
    pub realm: String,
}

impl Default for Config {
    /// No rules: every request passes.
    fn default() -> Self {
        Config {
            rules: Vec::new(),
            realm: DEFAULT_REALM.to_owned(),
        }
    }
}

/// The request fields the decision reads, as the header values' bytes. Absent headers
/// are empty, as Proxy-Wasm SDKs report them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    pub method: &'a [u8],
    /// The raw `:path`, query string included.
    pub path: &'a [u8],
    pub authority: &'a [u8],
    pub authorization: &'a [u8],
}

/// Why a request was refused; only for logs, the response is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    NoBasicCredentials,
    InvalidCredentials,
}

/// What the plugin does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'c> {
    Allow,
    /// Answer 401 with `WWW-Authenticate: Basic realm=<realm>`.
    Deny {
        realm: &'c str,
        reason: DenyReason,
        /// Position of the refusing rule in `basic_auth_rules`.
        rule: usize,
    },
}

impl Config {
    /// Parses the plugin configuration. Empty input means "no rules".
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        if bytes.is_empty() {
            return Ok(Config::default());
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::InvalidJson(e.to_string()))?;
        Config::from_value(&value)
    }

    /// Validates an already-parsed configuration.
    pub fn from_value(value: &Value) -> Result<Config, ConfigError> {
        let object = value
            .as_object()
            .ok_or(ConfigError::NotAnObject(kind(value)))?;
        let rules = match object.get("basic_auth_rules") {
            None => Vec::new(),
            Some(Value::Array(entries)) => entries
                .iter()
                .enumerate()
                .map(|(index, entry)| parse_rule(index, entry))
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(ConfigError::RulesNotArray(kind(other))),
        };
        let realm = match object.get("realm") {
            None => DEFAULT_REALM.to_owned(),
            Some(Value::String(realm)) => realm.clone(),
            Some(other) => return Err(ConfigError::RealmNotString(kind(other))),
        };
        Ok(Config { rules, realm })
    }

    /// Whether some rule names `hosts`: only then does a decision read `:authority`.
    pub fn matches_hosts(&self) -> bool {
        self.rules.iter().any(|r| !r.hosts.is_empty())
    }

    /// Checks every rule that applies, in configuration order; the first one
    /// that refuses the credentials decides.
    pub fn decide(&self, request: &Request<'_>) -> Decision<'_> {
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule.applies_to(request) {
                continue;
            }
            if let Err(reason) = rule.check(request.authorization) {
                return Decision::Deny {
                    realm: &self.realm,
                    reason,
                    rule: index,
                };
            }
        }
        Decision::Allow
    }
}

/// Whether `a == b`. The comparisons of a request against the rules are a few bytes each;
/// on wasm32 `==` on slices is a call to compiler-builtins' `memcmp` (the backend does not
/// expand it inline), and those calls were 320 of the 3,700 guest instructions of a request;
/// inlined, these loops cost about 120 (callgrind).
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

#[inline]
fn starts_with(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && same(&s[..prefix.len()], prefix)
}

#[inline]
fn ends_with(s: &[u8], suffix: &[u8]) -> bool {
    s.len() >= suffix.len() && same(&s[s.len() - suffix.len()..], suffix)
}

/// Drops a trailing `:port`, leaving bracketed IPv6 literals whole. Like
/// Istio's plugin, the last `:` counts as a port separator unless a `]`
/// follows it.
pub fn strip_port(authority: &[u8]) -> &[u8] {
    let last = |byte: u8| authority.iter().rposition(|&b| b == byte);
    match last(b':') {
        Some(colon) if last(b']').is_none_or(|bracket| bracket < colon) => &authority[..colon],
        _ => authority,
    }
}

fn parse_rule(index: usize, entry: &Value) -> Result<Rule, ConfigError> {
    let object = entry.as_object().ok_or(ConfigError::RuleNotObject {
        index,
        found: kind(entry),
    })?;
    let path = parse_path(index, object)?;

    let hosts = match object.get("hosts") {
        None => Vec::new(),
        Some(Value::Array(entries)) => entries
            .iter()
            .enumerate()
            .map(|(entry, host)| {
                host.as_str()
                    .map(HostMatch::parse)
                    .ok_or(ConfigError::HostNotString {
                        index,
                        entry,
                        found: kind(host),
                    })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ConfigError::HostsNotArray {
                index,
                found: kind(other),
            });
        }
    };

    let methods: Vec<String> = match object.get("request_methods") {
        Some(Value::Array(entries)) => entries
            .iter()
            .enumerate()
            .map(|(entry, method)| {
                method
                    .as_str()
                    .map(str::to_owned)
                    .ok_or(ConfigError::MethodNotString {
                        index,
                        entry,
                        found: kind(method),
                    })
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(ConfigError::MethodsNotArray {
                index,
                found: other.map_or("nothing", kind),
            });
        }
    };
    if methods.is_empty() {
        return Err(ConfigError::MethodsEmpty { index });
    }

    let encoded_credentials: Vec<String> = match object.get("credentials") {
        Some(Value::Array(entries)) => entries
            .iter()
            .enumerate()
            .map(|(entry, credential)| encode_credential(index, entry, credential))
            .collect::<Result<_, _>>()?,
        other => {
            return Err(ConfigError::CredentialsNotArray {
                index,
                found: other.map_or("nothing", kind),
            });
        }
    };
    if encoded_credentials.is_empty() {
        return Err(ConfigError::CredentialsEmpty { index });
    }

    Ok(Rule {
        hosts,
        path,
        methods,
        encoded_credentials,
    })
}

fn parse_path(index: usize, object: &Map<String, Value>) -> Result<PathMatch, ConfigError> {
    let present: Vec<(&'static str, &Value)> = ["prefix", "exact", "suffix"]
        .into_iter()
        .filter_map(|key| object.get(key).map(|value| (key, value)))
        .collect();
    let [(key, value)] = present.as_slice() else {
        return Err(ConfigError::PathKeyCount {
            index,
            count: present.len(),
        });
    };
    let path = value
        .as_str()
        .ok_or(ConfigError::PathNotString {
            index,
            key,
            found: kind(value),
        })?
        .to_owned();
    Ok(match *key {
        "prefix" => PathMatch::Prefix(path),
        "exact" => PathMatch::Exact(path),
        _ => PathMatch::Suffix(path),
    })
}

/// `user:password` is encoded here; anything else must already be base64 of
/// something non-empty and is kept exactly as written, since requests are
/// compared with it verbatim.
fn encode_credential(index: usize, entry: usize, value: &Value) -> Result<String, ConfigError> {
    let credential = value.as_str().ok_or(ConfigError::CredentialNotString {
        index,
        entry,
        found: kind(value),
    })?;
    if credential.contains(':') {
        return Ok(base64::engine::general_purpose::STANDARD.encode(credential));
    }
    match LENIENT_BASE64.decode(credential) {
        Ok(decoded) if !decoded.is_empty() => Ok(credential.to_owned()),
        _ => Err(ConfigError::CredentialUndecodable { index, entry }),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // base64("admin3:admin3"), the credential of Istio's walkthrough.
    const ADMIN3: &str = "YWRtaW4zOmFkbWluMw==";

    fn config(json: &str) -> Config {
        Config::parse(json.as_bytes()).expect("configuration should be accepted")
    }

    fn config_err(json: &str) -> ConfigError {
        Config::parse(json.as_bytes()).expect_err("configuration should be refused")
    }

    fn req<'a>(method: &'a str, path: &'a str, authority: &'a str, auth: &'a str) -> Request<'a> {
        Request {
            method: method.as_bytes(),
            path: path.as_bytes(),
            authority: authority.as_bytes(),
            authorization: auth.as_bytes(),
        }
    }

    fn allowed(config: &Config, request: Request<'_>) -> bool {
        match config.decide(&request) {
            Decision::Allow => true,
            Decision::Deny { .. } => false,
        }
    }

    fn basic(encoded: &str) -> String {
        format!("Basic {encoded}")
    }

    fn one_rule(path_key: &str, path: &str) -> Config {
        config(&format!(
            r#"{{"basic_auth_rules":[{{"{path_key}":"{path}","request_methods":["GET"],"credentials":["admin3:admin3"]}}]}}"#
        ))
    }

    // ---- configuration: accepted forms ----

    #[test]
    fn empty_config_allows_everything() {
        for raw in ["", "{}", r#"{"realm":"x"}"#, r#"{"other":1}"#] {
            let c = config(raw);
            assert!(c.rules.is_empty(), "{raw:?}");
            assert!(allowed(&c, req("GET", "/productpage", "h", "")), "{raw:?}");
        }
        assert!(config(r#"{"basic_auth_rules":[]}"#).rules.is_empty());
    }

    #[test]
    fn realm_defaults_to_istio_and_can_be_set() {
        assert_eq!(config("{}").realm, "istio");
        assert_eq!(config("").realm, "istio");
        assert_eq!(config(r#"{"realm":"bookinfo"}"#).realm, "bookinfo");
        let c = config(
            r#"{"realm":"shop","basic_auth_rules":[{"prefix":"/","request_methods":["GET"],"credentials":["a:b"]}]}"#,
        );
        assert_eq!(
            c.decide(&req("GET", "/", "h", "")),
            Decision::Deny {
                realm: "shop",
                reason: DenyReason::NoBasicCredentials,
                rule: 0
            }
        );
    }

    #[test]
    fn plain_credential_is_base64_encoded() {
        let c = one_rule("prefix", "/");
        assert_eq!(c.rules[0].encoded_credentials, vec![ADMIN3.to_owned()]);
        assert!(allowed(&c, req("GET", "/", "h", &basic(ADMIN3))));
    }

    #[test]
    fn encoded_credential_is_stored_verbatim() {
        let c = config(&format!(
            r#"{{"basic_auth_rules":[{{"prefix":"/","request_methods":["GET"],"credentials":["{ADMIN3}"]}}]}}"#
        ));
        assert_eq!(c.rules[0].encoded_credentials, vec![ADMIN3.to_owned()]);
        assert!(allowed(&c, req("GET", "/", "h", &basic(ADMIN3))));
        // Compared as written: the unpadded spelling of the same bytes is another string.
        assert!(!allowed(
            &c,
            req("GET", "/", "h", &basic("YWRtaW4zOmFkbWluMw"))
        ));
    }

    #[test]
    fn unpadded_encoded_credential_is_accepted_and_matched_as_written() {
        let c = config(
            r#"{"basic_auth_rules":[{"prefix":"/","request_methods":["GET"],"credentials":["YWRtaW4zOmFkbWluMw"]}]}"#,
        );
        assert!(allowed(
            &c,
            req("GET", "/", "h", "Basic YWRtaW4zOmFkbWluMw")
        ));
        assert!(!allowed(&c, req("GET", "/", "h", &basic(ADMIN3))));
    }

    #[test]
    fn walkthrough_service_credential_is_accepted() {
        let c = config(
            r#"{"basic_auth_rules":[{"prefix":"/reviews","request_methods":["GET"],"credentials":["MXQtaW4zOmFkbWluMw=="]}]}"#,
        );
        assert!(allowed(
            &c,
            req(
                "GET",
                "/reviews/1",
                "reviews:9080",
                "Basic MXQtaW4zOmFkbWluMw=="
            )
        ));
        assert!(!allowed(&c, req("GET", "/reviews/1", "reviews:9080", "")));
    }

    // ---- configuration: refused forms ----

    #[test]
    fn invalid_json_is_refused() {
        assert!(matches!(config_err("{"), ConfigError::InvalidJson(_)));
        assert!(matches!(config_err("   "), ConfigError::InvalidJson(_)));
    }

    #[test]
    fn non_object_config_is_refused() {
        assert_eq!(config_err("[]"), ConfigError::NotAnObject("an array"));
        assert_eq!(config_err("null"), ConfigError::NotAnObject("null"));
        assert_eq!(config_err(r#""x""#), ConfigError::NotAnObject("a string"));
    }

    #[test]
    fn rules_not_array_is_refused() {
        assert_eq!(
            config_err(r#"{"basic_auth_rules":{}}"#),
            ConfigError::RulesNotArray("an object")
        );
        assert_eq!(
            config_err(r#"{"basic_auth_rules":null}"#),
            ConfigError::RulesNotArray("null")
        );
    }

    #[test]
    fn rule_not_object_is_refused() {
        assert_eq!(
            config_err(r#"{"basic_auth_rules":["/x"]}"#),
            ConfigError::RuleNotObject {
                index: 0,
                found: "a string"
            }
        );
    }

    #[test]
    fn rule_without_path_key_is_refused() {
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"request_methods":["GET"],"credentials":["a:b"]}]}"#
            ),
            ConfigError::PathKeyCount { index: 0, count: 0 }
        );
    }

    #[test]
    fn rule_with_two_path_keys_is_refused() {
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"prefix":"/a","exact":"/b","request_methods":["GET"],"credentials":["a:b"]}]}"#
            ),
            ConfigError::PathKeyCount { index: 0, count: 2 }
        );
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"prefix":"/a","exact":"/b","suffix":"/c","request_methods":["GET"],"credentials":["a:b"]}]}"#
            ),
            ConfigError::PathKeyCount { index: 0, count: 3 }
        );
    }

    #[test]
    fn non_string_path_is_refused() {
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"exact":3,"request_methods":["GET"],"credentials":["a:b"]}]}"#
            ),
            ConfigError::PathNotString {
                index: 0,
                key: "exact",
                found: "a number"
            }
        );
    }

    #[test]
    fn methods_missing_is_refused() {
        assert_eq!(
            config_err(r#"{"basic_auth_rules":[{"prefix":"/","credentials":["a:b"]}]}"#),
            ConfigError::MethodsNotArray {
                index: 0,
                found: "nothing"
            }
        );
    }

    #[test]
    fn methods_empty_is_refused() {
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"prefix":"/","request_methods":[],"credentials":["a:b"]}]}"#
            ),
            ConfigError::MethodsEmpty { index: 0 }
        );
    }

    #[test]
    fn methods_not_array_is_refused() {
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"prefix":"/","request_methods":"GET","credentials":["a:b"]}]}"#
            ),
            ConfigError::MethodsNotArray {
                index: 0,
                found: "a string"
            }
        );
    }

    #[test]
    fn non_string_method_is_refused() {
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"prefix":"/","request_methods":["GET",1],"credentials":["a:b"]}]}"#
            ),
            ConfigError::MethodNotString {
                index: 0,
                entry: 1,
                found: "a number"
            }
        );
    }

    #[test]
    fn credentials_missing_is_refused() {
        assert_eq!(
            config_err(r#"{"basic_auth_rules":[{"prefix":"/","request_methods":["GET"]}]}"#),
            ConfigError::CredentialsNotArray {
                index: 0,
                found: "nothing"
            }
        );
    }

    #[test]
    fn credentials_empty_is_refused() {
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"prefix":"/","request_methods":["GET"],"credentials":[]}]}"#
            ),
            ConfigError::CredentialsEmpty { index: 0 }
        );
    }

    #[test]
    fn credentials_not_array_is_refused() {
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"prefix":"/","request_methods":["GET"],"credentials":"a:b"}]}"#
            ),
            ConfigError::CredentialsNotArray {
                index: 0,
                found: "a string"
            }
        );
    }

    #[test]
    fn undecodable_credential_is_refused() {
        for bad in ["not base64!", "", "@@@@", "A"] {
            let raw = format!(
                r#"{{"basic_auth_rules":[{{"prefix":"/","request_methods":["GET"],"credentials":["a:b","{bad}"]}}]}}"#
            );
            assert_eq!(
                config_err(&raw),
                ConfigError::CredentialUndecodable { index: 0, entry: 1 },
                "{bad:?}"
            );
        }
    }

    #[test]
    fn non_string_credential_is_refused() {
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"prefix":"/","request_methods":["GET"],"credentials":[{}]}]}"#
            ),
            ConfigError::CredentialNotString {
                index: 0,
                entry: 0,
                found: "an object"
            }
        );
    }

    #[test]
    fn non_string_host_is_refused() {
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"hosts":["a",null],"prefix":"/","request_methods":["GET"],"credentials":["a:b"]}]}"#
            ),
            ConfigError::HostNotString {
                index: 0,
                entry: 1,
                found: "null"
            }
        );
        assert_eq!(
            config_err(
                r#"{"basic_auth_rules":[{"hosts":"a","prefix":"/","request_methods":["GET"],"credentials":["a:b"]}]}"#
            ),
            ConfigError::HostsNotArray {
                index: 0,
                found: "a string"
            }
        );
    }

    #[test]
    fn non_string_realm_is_refused() {
        assert_eq!(
            config_err(r#"{"realm":5}"#),
            ConfigError::RealmNotString("a number")
        );
    }

    #[test]
    fn error_in_later_rule_names_its_index() {
        let err = config_err(
            r#"{"basic_auth_rules":[
                {"prefix":"/","request_methods":["GET"],"credentials":["a:b"]},
                {"prefix":"/","request_methods":["GET"],"credentials":[]}]}"#,
        );
        assert_eq!(err, ConfigError::CredentialsEmpty { index: 1 });
        assert!(err.to_string().contains("rule 1"), "{err}");
    }

    // ---- path matching ----

    #[test]
    fn prefix_path() {
        let c = one_rule("prefix", "/productpage");
        assert!(!allowed(&c, req("GET", "/productpage", "h", "")));
        assert!(!allowed(&c, req("GET", "/productpage/x", "h", "")));
        assert!(!allowed(&c, req("GET", "/productpages", "h", "")));
        assert!(allowed(&c, req("GET", "/api/productpage", "h", "")));
        assert!(allowed(&c, req("GET", "/", "h", "")));
        assert!(allowed(&c, req("GET", "/productpage", "h", &basic(ADMIN3))));
    }

    #[test]
    fn exact_path() {
        let c = one_rule("exact", "/login");
        assert!(!allowed(&c, req("GET", "/login", "h", "")));
        assert!(allowed(&c, req("GET", "/login/", "h", "")));
        assert!(allowed(&c, req("GET", "/log", "h", "")));
        assert!(allowed(&c, req("GET", "/login", "h", &basic(ADMIN3))));
    }

    #[test]
    fn suffix_path() {
        let c = one_rule("suffix", ".php");
        assert!(!allowed(&c, req("GET", "/index.php", "h", "")));
        assert!(!allowed(&c, req("GET", "/a/b.php", "h", "")));
        assert!(allowed(&c, req("GET", "/index.html", "h", "")));
        assert!(allowed(&c, req("GET", "/index.php", "h", &basic(ADMIN3))));
    }

    #[test]
    fn path_is_case_sensitive() {
        let c = one_rule("prefix", "/admin");
        assert!(allowed(&c, req("GET", "/ADMIN", "h", "")));
    }

    #[test]
    fn query_string_is_part_of_the_path() {
        let exact = one_rule("exact", "/login");
        assert!(allowed(&exact, req("GET", "/login?next=/", "h", "")));
        let suffix = one_rule("suffix", ".php");
        assert!(allowed(&suffix, req("GET", "/index.php?x=1", "h", "")));
        assert!(!allowed(&suffix, req("GET", "/?file=a.php", "h", "")));
        let prefix = one_rule("prefix", "/search?q=");
        assert!(!allowed(&prefix, req("GET", "/search?q=secret", "h", "")));
        assert!(allowed(&prefix, req("GET", "/search", "h", "")));
    }

    // ---- methods ----

    #[test]
    fn methods_match_exactly() {
        let c = config(
            r#"{"basic_auth_rules":[{"prefix":"/","request_methods":["GET","POST"],"credentials":["a:b"]}]}"#,
        );
        assert!(!allowed(&c, req("GET", "/", "h", "")));
        assert!(!allowed(&c, req("POST", "/", "h", "")));
        assert!(allowed(&c, req("PUT", "/", "h", "")), "no rule for PUT");
        assert!(
            allowed(&c, req("get", "/", "h", "")),
            "methods are case-sensitive"
        );
        assert!(allowed(&c, req("", "/", "h", "")));
    }

    // ---- hosts ----

    fn hosts_rule(hosts: &str) -> Config {
        config(&format!(
            r#"{{"basic_auth_rules":[{{"hosts":{hosts},"prefix":"/","request_methods":["GET"],"credentials":["a:b"]}}]}}"#
        ))
    }

    fn host_protected(c: &Config, authority: &str) -> bool {
        !allowed(c, req("GET", "/", authority, ""))
    }

    #[test]
    fn host_patterns_parse() {
        assert_eq!(HostMatch::parse("*.foo"), HostMatch::Suffix(".foo".into()));
        assert_eq!(HostMatch::parse("foo*"), HostMatch::Prefix("foo".into()));
        assert_eq!(HostMatch::parse("foo"), HostMatch::Exact("foo".into()));
        assert_eq!(HostMatch::parse("*"), HostMatch::Suffix(String::new()));
    }

    #[test]
    fn exact_host() {
        let c = hosts_rule(r#"["bookinfo.com"]"#);
        assert!(host_protected(&c, "bookinfo.com"));
        assert!(host_protected(&c, "bookinfo.com:8080"));
        assert!(!host_protected(&c, "www.bookinfo.com"));
        assert!(
            !host_protected(&c, "Bookinfo.com"),
            "hosts are case-sensitive"
        );
        assert!(!host_protected(&c, ""));
    }

    #[test]
    fn suffix_host_wildcard() {
        let c = hosts_rule(r#"["*.example.com"]"#);
        assert!(host_protected(&c, "a.example.com"));
        assert!(host_protected(&c, "a.b.example.com:443"));
        assert!(!host_protected(&c, "example.com"));
        assert!(!host_protected(&c, "example.com.evil"));
    }

    #[test]
    fn prefix_host_wildcard() {
        let c = hosts_rule(r#"["productpage*"]"#);
        assert!(host_protected(&c, "productpage"));
        assert!(host_protected(
            &c,
            "productpage.default.svc.cluster.local:9080"
        ));
        assert!(!host_protected(&c, "reviews"));
    }

    #[test]
    fn lone_star_matches_every_host() {
        let c = hosts_rule(r#"["*"]"#);
        assert!(host_protected(&c, "anything:1"));
        assert!(host_protected(&c, ""));
    }

    #[test]
    fn absent_or_empty_hosts_match_every_host() {
        assert!(host_protected(&one_rule("prefix", "/"), "x"));
        assert!(host_protected(&hosts_rule("[]"), "x"));
    }

    #[test]
    fn authority_is_read_only_for_rules_with_hosts() {
        assert!(!one_rule("prefix", "/").matches_hosts());
        assert!(!hosts_rule("[]").matches_hosts());
        assert!(hosts_rule(r#"["a.com"]"#).matches_hosts());
    }

    #[test]
    fn any_listed_host_is_enough() {
        let c = hosts_rule(r#"["a.com","*.b.com"]"#);
        assert!(host_protected(&c, "a.com"));
        assert!(host_protected(&c, "x.b.com"));
        assert!(!host_protected(&c, "c.com"));
    }

    #[test]
    fn ipv6_authority() {
        let c = hosts_rule(r#"["[::1]"]"#);
        assert!(host_protected(&c, "[::1]:80"));
        assert!(host_protected(&c, "[::1]"));
        assert!(!host_protected(&c, "[::2]:80"));
        let ipv4 = hosts_rule(r#"["127.0.0.1"]"#);
        assert!(host_protected(&ipv4, "127.0.0.1:9080"));
    }

    #[test]
    fn port_stripping() {
        assert_eq!(strip_port(b"foo:8080"), b"foo");
        assert_eq!(strip_port(b"foo"), b"foo");
        assert_eq!(strip_port(b"foo:"), b"foo");
        assert_eq!(strip_port(b"[::1]:80"), b"[::1]");
        assert_eq!(strip_port(b"[::1]"), b"[::1]");
        assert_eq!(strip_port(b"[fe80::1%25eth0]:443"), b"[fe80::1%25eth0]");
        assert_eq!(strip_port(b""), b"");
    }

    // ---- credentials ----

    #[test]
    fn authorization_must_be_basic_with_exact_case() {
        let c = one_rule("prefix", "/");
        let deny = |auth: &str| c.decide(&req("GET", "/", "h", auth));
        for auth in [
            "",
            "Basic",
            "basic YWRtaW4zOmFkbWluMw==",
            "Bearer x",
            "BasicYWRtaW4zOmFkbWluMw==",
        ] {
            assert!(
                matches!(
                    deny(auth),
                    Decision::Deny {
                        reason: DenyReason::NoBasicCredentials,
                        ..
                    }
                ),
                "{auth:?}"
            );
        }
        for auth in [
            "Basic ",
            "Basic  YWRtaW4zOmFkbWluMw==",
            "Basic YWRtaW4zOmFkbWluMw== ",
            "Basic YWRtaW4zOmFkbWluMg==",
        ] {
            assert!(
                matches!(
                    deny(auth),
                    Decision::Deny {
                        reason: DenyReason::InvalidCredentials,
                        ..
                    }
                ),
                "{auth:?}"
            );
        }
    }

    #[test]
    fn header_values_that_are_not_utf8_are_compared_as_bytes() {
        let c = one_rule("prefix", "/");
        let with = |path: &[u8], auth: &[u8]| {
            c.decide(&Request {
                method: b"GET",
                path,
                authority: b"h",
                authorization: auth,
            })
        };
        // A stray obs-text byte in the credentials is a wrong credential, not a fault.
        assert!(matches!(
            with(b"/", b"Basic YWRtaW4zOmFkbWluMw\xff"),
            Decision::Deny {
                reason: DenyReason::InvalidCredentials,
                ..
            }
        ));
        // The path is matched on its bytes too: the prefix still protects it.
        assert!(matches!(
            with(b"/caf\xe9", b""),
            Decision::Deny {
                reason: DenyReason::NoBasicCredentials,
                ..
            }
        ));
        assert_eq!(with(b"/caf\xe9", ADMIN3_HEADER), Decision::Allow);
    }

    const ADMIN3_HEADER: &[u8] = b"Basic YWRtaW4zOmFkbWluMw==";

    #[test]
    fn constant_time_eq_agrees_with_equality() {
        let samples: [&[u8]; 9] = [
            b"",
            b"a",
            b"b",
            b"abcdefg",
            b"abcdefgh",
            b"abcdefgi",
            b"abcdefghi",
            b"bbcdefghijklmnopq",
            b"abcdefghijklmnopq",
        ];
        for a in samples {
            for b in samples {
                assert_eq!(constant_time_eq(a, b), a == b, "{a:?} vs {b:?}");
            }
        }
        // A difference in any position of a long value, word or tail, is found.
        let base = *b"YWRtaW4zOmFkbWluMw==";
        for i in 0..base.len() {
            let mut other = base;
            other[i] ^= 0x01;
            assert!(!constant_time_eq(&base, &other), "byte {i}");
        }
    }

    #[test]
    fn any_credential_of_the_rule_is_accepted() {
        let c = config(
            r#"{"basic_auth_rules":[{"prefix":"/","request_methods":["GET"],"credentials":["ok:test","admin:admin","YWRtaW4yOmFkbWluMg=="]}]}"#,
        );
        for (user, pass) in [("ok", "test"), ("admin", "admin"), ("admin2", "admin2")] {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            assert!(
                allowed(&c, req("GET", "/", "h", &basic(&encoded))),
                "{user}"
            );
        }
        let wrong = base64::engine::general_purpose::STANDARD.encode("ok:wrong");
        assert!(!allowed(&c, req("GET", "/", "h", &basic(&wrong))));
    }

    #[test]
    fn password_may_contain_colons() {
        let c = config(
            r#"{"basic_auth_rules":[{"prefix":"/","request_methods":["GET"],"credentials":["u:p:w"]}]}"#,
        );
        assert!(allowed(&c, req("GET", "/", "h", "Basic dTpwOnc=")));
    }

    // ---- several rules ----

    #[test]
    fn every_matching_rule_must_accept() {
        let c = config(
            r#"{"basic_auth_rules":[
                {"prefix":"/","request_methods":["GET"],"credentials":["a:a"]},
                {"prefix":"/admin","request_methods":["GET"],"credentials":["b:b"]}]}"#,
        );
        let a = basic("YTph");
        let b = basic("Yjpi");
        assert!(allowed(&c, req("GET", "/home", "h", &a)));
        assert!(!allowed(&c, req("GET", "/home", "h", &b)));
        // Both rules apply to /admin and each wants its own credential.
        assert!(!allowed(&c, req("GET", "/admin", "h", &a)));
        assert!(!allowed(&c, req("GET", "/admin", "h", &b)));
    }

    #[test]
    fn first_refusing_rule_is_reported() {
        let c = config(
            r#"{"basic_auth_rules":[
                {"prefix":"/a","request_methods":["GET"],"credentials":["a:a"]},
                {"prefix":"/","request_methods":["GET"],"credentials":["b:b"]}]}"#,
        );
        assert_eq!(
            c.decide(&req("GET", "/x", "h", "Basic YTph")),
            Decision::Deny {
                realm: "istio",
                reason: DenyReason::InvalidCredentials,
                rule: 1
            }
        );
        assert!(matches!(
            c.decide(&req("GET", "/a", "h", "Basic Yjpi")),
            Decision::Deny { rule: 0, .. }
        ));
    }

    #[test]
    fn rules_differ_by_method_and_host() {
        let c = config(
            r#"{"basic_auth_rules":[
                {"hosts":["gateway.local"],"prefix":"/productpage","request_methods":["GET"],"credentials":["admin3:admin3"]},
                {"prefix":"/reviews","request_methods":["POST"],"credentials":["1t-in3:admin3"]}]}"#,
        );
        assert!(!allowed(
            &c,
            req("GET", "/productpage", "gateway.local:80", "")
        ));
        assert!(allowed(
            &c,
            req("GET", "/productpage", "productpage:9080", "")
        ));
        assert!(allowed(&c, req("GET", "/reviews/1", "reviews:9080", "")));
        assert!(!allowed(&c, req("POST", "/reviews/1", "reviews:9080", "")));
        assert!(allowed(
            &c,
            req(
                "POST",
                "/reviews/1",
                "reviews:9080",
                "Basic MXQtaW4zOmFkbWluMw=="
            )
        ));
    }

    #[test]
    fn error_messages_name_the_field() {
        let err = config_err(r#"{"basic_auth_rules":[{"prefix":"/","credentials":["a:b"]}]}"#);
        assert_eq!(
            err.to_string(),
            "basic_auth rule 0: `request_methods` must be an array of strings, got nothing"
        );
    }
}
