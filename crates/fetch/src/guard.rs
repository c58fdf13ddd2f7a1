//! SSRF guard: module urls and token realms come from configuration other people write, so
//! the fetcher must not become a way to read cloud instance metadata or poke at link-local
//! services. Hostnames are resolved before the check so a name cannot hide such an address.

use std::net::{IpAddr, Ipv6Addr};

/// Metadata services reachable by name on the major clouds.
const METADATA_NAMES: &[&str] = &["metadata.google.internal", "metadata.goog"];
/// AWS's IPv6 instance metadata endpoint (`fd00:ec2::254`).
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254);

/// Why a destination was refused; rendered into the caller's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Link-local or metadata: never dialled.
    Metadata(String),
    /// Private or loopback token realm while those are not allowed.
    PrivateRealm(String),
}

impl Refusal {
    pub fn reason(&self) -> String {
        match self {
            Refusal::Metadata(addr) => {
                format!("refusing to fetch from link-local/metadata address {addr}")
            }
            Refusal::PrivateRealm(addr) => format!(
                "refusing token realm on private/loopback address {addr} \
                 (set allow_private_realms to permit it)"
            ),
        }
    }
}

pub(crate) fn is_link_local_or_metadata(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == AWS_METADATA_V6,
    }
}

fn is_private_or_loopback(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xfe00) == 0xfc00 || v6.is_loopback() || v6.is_unspecified()
        }
    }
}

/// `::ffff:a.b.c.d` reaches the IPv4 host: judge it as that host.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn is_metadata_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    METADATA_NAMES.contains(&host.as_str())
}

/// Judges one literal address.
fn judge(ip: IpAddr, private_allowed: bool) -> Result<(), Refusal> {
    if is_link_local_or_metadata(ip) {
        return Err(Refusal::Metadata(ip.to_string()));
    }
    if !private_allowed && is_private_or_loopback(ip) {
        return Err(Refusal::PrivateRealm(ip.to_string()));
    }
    Ok(())
}

/// Checks `host` (a name, an IPv4 literal, or an IPv6 literal with or without brackets)
/// before anything connects to it. Names are resolved and every address is judged: one bad
/// address is enough to refuse, since the connector may pick any of them. A name that does
/// not resolve passes; the request itself then fails with the resolver's error.
pub(crate) async fn check_host(
    host: &str,
    port: u16,
    private_allowed: bool,
) -> Result<(), Refusal> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if is_metadata_name(bare) {
        return Err(Refusal::Metadata(bare.to_string()));
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return judge(ip, private_allowed);
    }
    if let Ok(addrs) = tokio::net::lookup_host((bare, port)).await {
        for addr in addrs {
            judge(addr.ip(), private_allowed)?;
        }
    }
    Ok(())
}

/// Checks the host of a url; see [`check_host`].
pub(crate) async fn check_url(url: &reqwest::Url, private_allowed: bool) -> Result<(), Refusal> {
    let Some(host) = url.host_str() else {
        return Ok(());
    };
    check_host(
        host,
        url.port_or_known_default().unwrap_or(443),
        private_allowed,
    )
    .await
}

/// Synchronous variant for redirect targets: literal addresses and metadata names only, since
/// a redirect policy cannot await a lookup. Resolved names are covered by [`GuardedResolver`].
pub(crate) fn check_literal(url: &reqwest::Url) -> Result<(), Refusal> {
    let Some(host) = url.host_str() else {
        return Ok(());
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if is_metadata_name(bare) {
        return Err(Refusal::Metadata(bare.to_string()));
    }
    match bare.parse::<IpAddr>() {
        Ok(ip) if is_link_local_or_metadata(ip) => Err(Refusal::Metadata(ip.to_string())),
        _ => Ok(()),
    }
}

/// The resolver every client uses: drops link-local/metadata answers, so a name that changes
/// its answer after [`check_host`] looked (DNS rebinding), or a redirect to such a name, still
/// cannot reach those addresses.
pub(crate) struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            if is_metadata_name(&host) {
                return Err(Refusal::Metadata(host).reason().into());
            }
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| is_link_local_or_metadata(a.ip())) {
                return Err(Refusal::Metadata(bad.ip().to_string()).reason().into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literal_and_named_refusals() {
        for host in [
            "169.254.169.254",
            "169.254.1.2",
            "[fe80::1]",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "metadata.google.internal",
            "METADATA.GOOGLE.INTERNAL.",
        ] {
            assert!(
                matches!(check_host(host, 80, true).await, Err(Refusal::Metadata(_))),
                "{host}"
            );
        }
        for host in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "fc00::1",
            "127.0.0.1",
            "::1",
        ] {
            assert!(
                matches!(
                    check_host(host, 80, false).await,
                    Err(Refusal::PrivateRealm(_))
                ),
                "{host}"
            );
            assert_eq!(check_host(host, 80, true).await, Ok(()), "{host}");
        }
        assert_eq!(check_host("172.32.0.1", 80, false).await, Ok(()));
        assert_eq!(check_host("localhost", 80, true).await, Ok(()));
        assert!(check_host("localhost", 80, false).await.is_err());
    }

    #[test]
    fn redirect_targets() {
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(check_literal(&url("http://169.254.169.254/latest")).is_err());
        assert!(check_literal(&url("http://[fe80::1]/")).is_err());
        assert!(check_literal(&url("http://metadata.google.internal/")).is_err());
        assert!(check_literal(&url("http://127.0.0.1/")).is_ok());
    }
}
