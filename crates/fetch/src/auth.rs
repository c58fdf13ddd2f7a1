//! Registry credentials: `.dockerconfigjson` pull secrets and `WWW-Authenticate` challenges.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

/// A username/password pair; Debug never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", STANDARD.encode(raw))
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Finds the credentials for `registry` (`host[:port]`) in a `.dockerconfigjson`.
///
/// Errors never quote the secret: the message names only what is malformed.
pub(crate) fn credentials_for(
    secret: &[u8],
    registry: &str,
) -> Result<Option<Credentials>, String> {
    let config: DockerConfig = serde_json::from_slice(secret).map_err(|e| {
        format!(
            "not a .dockerconfigjson (expected {{\"auths\": {{...}}}}; JSON error at line {} column {})",
            e.line(),
            e.column()
        )
    })?;
    let wanted = aliases(registry);
    // Docker's order: the key exactly as the registry is named, then any key that names the
    // same host once its scheme and path are dropped (`https://host:port/v1/`).
    let exact = wanted.iter().find_map(|w| config.auths.get_key_value(*w));
    let normalized = || {
        config.auths.iter().find(|(key, _)| {
            let host = normalize_key(key);
            wanted.iter().any(|w| w.eq_ignore_ascii_case(host))
        })
    };
    let Some((key, entry)) = exact.or_else(normalized) else {
        return Ok(None);
    };
    // `{}` is what `docker login` leaves in `auths` when a credential helper holds the secret.
    if entry.auth.is_none() && entry.username.is_none() && entry.password.is_none() {
        return Ok(None);
    }
    entry_credentials(entry)
        .map(Some)
        .map_err(|reason| format!("entry for {key}: {reason}"))
}

fn entry_credentials(entry: &AuthEntry) -> Result<Credentials, String> {
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        return Ok(Credentials {
            username: username.clone(),
            password: password.clone(),
        });
    }
    let auth = entry
        .auth
        .as_deref()
        .ok_or("has neither \"auth\" nor \"username\"/\"password\"")?;
    let decoded = STANDARD
        .decode(auth.trim())
        .map_err(|_| "\"auth\" is not valid base64")?;
    let decoded = String::from_utf8(decoded).map_err(|_| "\"auth\" is not UTF-8")?;
    let (username, password) = decoded
        .split_once(':')
        .ok_or("\"auth\" does not decode to user:password")?;
    Ok(Credentials {
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// Where the user's docker config is: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`, as the docker CLI looks for it.
pub(crate) fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".docker").join("config.json"))
}

/// `https://host:port/v1/` → `host:port`.
fn normalize_key(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

fn aliases(registry: &str) -> Vec<&str> {
    if registry == "docker.io" {
        // `docker login` writes Docker Hub as `https://index.docker.io/v1/`.
        vec![
            "https://index.docker.io/v1/",
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
        ]
    } else {
        vec![registry]
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Other(String),
}

pub(crate) fn parse_challenge(header: &str) -> Challenge {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Challenge::Basic;
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Challenge::Other(scheme.to_string());
    }
    let params = parse_params(params);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    match get("realm") {
        Some(realm) => Challenge::Bearer {
            realm,
            service: get("service"),
            scope: get("scope"),
        },
        None => Challenge::Other("Bearer without realm".into()),
    }
}

/// `k="v", k2=v2` with quoted values that may hold commas (scopes do: `pull,push`).
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            rest = &quoted[end.min(quoted.len())..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        out.push((key, value));
    }
    out
}

#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_auth_and_username_forms() {
        let auth = STANDARD.encode("alice:s3cr:et");
        let secret = format!(
            r#"{{"auths":{{"https://127.0.0.1:5000/v1/":{{"auth":"{auth}"}},"other:1":{{"username":"bob","password":"pw"}}}}}}"#
        );
        let c = credentials_for(secret.as_bytes(), "127.0.0.1:5000")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cr:et")
        );
        let c = credentials_for(secret.as_bytes(), "other:1")
            .unwrap()
            .unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("bob", "pw"));
        assert_eq!(credentials_for(secret.as_bytes(), "nope:1").unwrap(), None);
    }

    #[test]
    fn docker_style_keys() {
        let auth = STANDARD.encode("hub:pw");
        let hub = format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}}}}}}"#);
        let c = credentials_for(hub.as_bytes(), "docker.io")
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "hub");
        // An exact key wins over one that only normalizes to the host; hosts ignore case.
        let both = r#"{"auths":{"http://Reg.Example:5000/v2/":{"username":"a","password":"1"},
                                "reg.example:5000":{"username":"b","password":"2"}}}"#;
        let c = credentials_for(both.as_bytes(), "reg.example:5000")
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "b");
        let one = r#"{"auths":{"http://Reg.Example:5000/v2/":{"username":"a","password":"1"}}}"#;
        let c = credentials_for(one.as_bytes(), "reg.example:5000")
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "a");
        // A credential-helper placeholder is no credentials, not an error.
        let helper = r#"{"auths":{"reg.example:5000":{}},"credsStore":"desktop"}"#;
        assert_eq!(
            credentials_for(helper.as_bytes(), "reg.example:5000").unwrap(),
            None
        );
    }

    #[test]
    fn bad_secret_does_not_echo_content() {
        let err = credentials_for(b"{\"auths\": hunter2", "h:1").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        let err = credentials_for(br#"{"auths":{"h:1":{"auth":"!!hunter2"}}}"#, "h:1").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Challenge::Basic
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(
            parse_challenge("Bearer realm=http://t/token, service=s"),
            Challenge::Bearer {
                realm: "http://t/token".into(),
                service: Some("s".into()),
                scope: None
            }
        );
        assert!(matches!(parse_challenge("Negotiate"), Challenge::Other(_)));
    }
}
