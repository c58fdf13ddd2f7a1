//! The command line, as clap parses it. Flags follow kubectl and istioctl so their muscle
//! memory carries over.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "waystone",
    version,
    about = "Proxy-Wasm gateways and waypoints on one machine, configured with Istio's resources",
    long_about = "Waystone runs Proxy-Wasm plugins (WasmPlugin, TrafficExtension) in Rust gateways \
                  and waypoints, configured by the resources Istio users already write. \
                  Start it with 'waystone up', then use kubectl- and istioctl-shaped commands."
)]
pub struct Cli {
    /// Where Waystone keeps its store, module cache and API address
    /// [default: $XDG_DATA_HOME/waystone, else ~/.local/share/waystone]
    #[arg(long, global = true, env = "WAYSTONE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Talk to this Kubernetes cluster's API server instead of the local API (apply, get,
    /// delete, label, waypoint, proxy-config, describe); KUBECONFIG does the same
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Log more (debug level) unless RUST_LOG says otherwise
    #[arg(short, long, global = true)]
    pub verbose: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the control plane and every gateway and waypoint in this process
    Up(UpArgs),
    /// Apply a configuration from files, a directory or stdin (like kubectl apply)
    Apply(ApplyArgs),
    /// Display one or many resources (like kubectl get)
    Get(GetArgs),
    /// Delete resources by kind and names, or by file (like kubectl delete)
    Delete(DeleteArgs),
    /// Update the labels on a resource (like kubectl label)
    Label(LabelArgs),
    /// Manage waypoints (like istioctl waypoint)
    #[command(subcommand)]
    Waypoint(WaypointCommand),
    /// Run the control plane in a Kubernetes cluster: status, and a data plane per Gateway
    Controller(ControllerArgs),
    /// Run one gateway's or waypoint's data plane, configured from a Kubernetes cluster
    Proxy(ProxyArgs),
    /// Push a Wasm module to an OCI registry
    Push(PushArgs),
    /// Run demo applications
    #[command(subcommand)]
    Demo(DemoCommand),
    /// Inspect or prune the on-disk Wasm module cache (fetched and compiled modules) under
    /// <data-dir>/cache
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Show what a gateway or waypoint runs: chains, routes, plugins, endpoints
    /// (like istioctl proxy-config)
    ProxyConfig(ProxyConfigArgs),
    /// Show one object in detail (like kubectl describe)
    Describe(DescribeArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProxyConfigSection {
    /// Plugin chains in execution order, per listener (gateways) or service port (waypoints)
    Chains,
    /// Routes of each listener
    Routes,
    /// Every plugin the gateway runs, with its module and load state
    Plugins,
    /// Endpoints of the services the gateway sends to
    Endpoints,
    /// Everything
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProxyConfigOutput {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Args)]
pub struct ProxyConfigArgs {
    /// The gateway or waypoint (a Gateway's name)
    #[arg(value_name = "GATEWAY")]
    pub gateway: String,

    /// What to show
    #[arg(value_enum, value_name = "SECTION", default_value = "all")]
    pub section: ProxyConfigSection,

    /// The namespace [default: default]
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,

    /// Output format
    #[arg(
        short,
        long,
        value_enum,
        value_name = "FORMAT",
        default_value = "table"
    )]
    pub output: ProxyConfigOutput,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// The kind (wasmplugin, trafficextension)
    #[arg(value_name = "KIND")]
    pub kind: String,

    /// The object's name
    #[arg(value_name = "NAME")]
    pub name: String,

    /// The namespace [default: default]
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List cached modules and compiled modules with their size, last use and sources
    List,
    /// Remove modules and compiled modules that were not used for a while
    Prune(CachePruneArgs),
}

#[derive(Debug, Args)]
pub struct CachePruneArgs {
    /// Remove modules unused for at least this long (e.g. 30m, 24h, 168h)
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub unused_for: Duration,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// A registry (HOST:PORT, or '*' for all) that may be reached over plain HTTP;
    /// repeatable, merged with WAYSTONE_INSECURE_REGISTRIES (comma-separated)
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,

    /// Address gateway listeners bind to
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub gateway_address: IpAddr,

    /// The local mesh entry (ztunnel's stand-in): send in-mesh requests here
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15001")]
    pub entry_address: SocketAddr,

    /// The local API (loopback only; port 0 picks a free one, written to <data-dir>/api.addr)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub api_address: SocketAddr,

    /// Data-plane worker threads [default: the number of cores]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,

    /// Local mesh over HBONE: waypoints take mTLS HTTP/2 CONNECT and the mesh entry sends it,
    /// with certificates from a CA kept under <data-dir>/hbone
    #[arg(long)]
    pub hbone: bool,

    /// HBONE identity from files (PEM certificate chain; needs --hbone-key and --hbone-roots):
    /// waypoints take HBONE with it; the files are reloaded when they change
    #[arg(long, value_name = "FILE", requires_all = ["hbone_key", "hbone_roots"])]
    pub hbone_cert: Option<std::path::PathBuf>,

    /// The private key for --hbone-cert (PEM)
    #[arg(long, value_name = "FILE", requires = "hbone_cert")]
    pub hbone_key: Option<std::path::PathBuf>,

    /// Trust roots HBONE peers must chain to (PEM)
    #[arg(long, value_name = "FILE", requires = "hbone_cert")]
    pub hbone_roots: Option<std::path::PathBuf>,

    /// SPIFFE trust domain of HBONE peers
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// An endpoint reached through HBONE: IP (its ztunnel at IP:15008) or ENDPOINT=TUNNEL
    /// (both IP:PORT); repeatable
    #[arg(long = "hbone-endpoint", value_name = "IP|ENDPOINT=TUNNEL")]
    pub hbone_endpoints: Vec<String>,

    /// A PEM file of CA certificates to trust for https registries and module servers,
    /// besides the system's roots
    #[arg(long, value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,

    /// Purge cached modules and compiled modules unused this long (checked hourly)
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub cache_max_unused: Duration,

    /// The admin endpoint (/ready, /config_dump, /stats/prometheus, /logging); port 0 picks a
    /// free one; the bound address is written to <data-dir>/admin.addr
    /// [default: 127.0.0.1:15000, or a free port there when another process holds 15000]
    #[arg(long, value_name = "ADDR")]
    pub admin_address: Option<SocketAddr>,

    /// Access log format of gateways and waypoints without a waystone.io/access-log annotation
    #[arg(long, value_name = "FORMAT", default_value = "off", value_parser = ["off", "text", "json"])]
    pub access_log: String,

    /// Write access logs to this file (appending) instead of stdout
    #[arg(long, value_name = "FILE")]
    pub access_log_file: Option<PathBuf>,

    /// Trace requests: export spans as OTLP/HTTP JSON to this collector (http://HOST:PORT)
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// Longest a plugin callback may run before it is interrupted and its fail strategy applies
    /// (e.g. 500ms, 2s)
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_positive_duration)]
    pub wasm_call_deadline: Duration,

    /// Linear memory cap of each plugin instance, in MiB; growing past it traps and the
    /// instance is replaced
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub wasm_memory_mib: u32,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// A GatewayClass whose Gateways this controller serves; repeatable
    /// [default: waystone, istio-waypoint]
    #[arg(long = "gateway-class", value_name = "NAME")]
    pub gateway_classes: Vec<String>,

    /// The image data-plane Deployments run
    #[arg(long, value_name = "IMAGE", env = "WAYSTONE_PROXY_IMAGE")]
    pub proxy_image: Option<String>,

    /// Write status only; do not create Deployments, Services and ServiceAccounts
    #[arg(long)]
    pub no_deploy: bool,

    /// Waypoint Deployments take their HBONE identity from Istio's CA (the proxy's
    /// --istio-ca; mounts the istio-ca token and the istio-ca-root-cert ConfigMap)
    #[arg(long)]
    pub waypoint_istio_ca: bool,

    /// A registry (HOST:PORT, or '*') that may be reached over plain HTTP; repeatable
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The Gateway (or waypoint) this data plane runs, as NAMESPACE/NAME
    #[arg(long, value_name = "NS/NAME")]
    pub gateway: String,

    /// Address the gateway's listeners bind to
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    pub gateway_address: IpAddr,

    /// Also open a local mesh entry here (ztunnel's stand-in, for clusters without ztunnel)
    #[arg(long, value_name = "ADDR")]
    pub entry_address: Option<SocketAddr>,

    /// Data-plane worker threads [default: the number of cores]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,

    /// After each configuration swap, write where the listeners are (JSON) to this file
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,

    /// The admin endpoint (/ready, /config_dump, /stats/prometheus, /logging): Istio's admin
    /// port, on every interface so that `waystone proxy-config` can reach it through the API
    /// server's pod proxy (port 0 picks a free one; the ready file says which)
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15000")]
    pub admin_address: SocketAddr,

    /// A registry (HOST:PORT, or '*') that may be reached over plain HTTP; repeatable
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,

    #[command(flatten)]
    pub hbone: ProxyHboneArgs,
}

/// HBONE on `waystone proxy`: the waypoint's `mesh` listener takes mTLS HTTP/2 CONNECT with an
/// identity from Istio's CA or from files.
#[derive(Debug, Args)]
pub struct ProxyHboneArgs {
    /// HBONE identity from Istio's CA (istiod's IstioCertificateService, as istio-agent and
    /// ztunnel use it), renewed before it expires
    #[arg(long, conflicts_with = "hbone_cert")]
    pub istio_ca: bool,

    /// The CA's address (the mesh config's caAddress)
    #[arg(long, env = "CA_ADDR", value_name = "HOST:PORT",
          default_value = waystone_proxy::hbone::istio_ca::DEFAULT_CA_ADDRESS)]
    pub ca_address: String,

    /// The name the CA's serving certificate must carry [default: the host of --ca-address]
    #[arg(long, value_name = "NAME")]
    pub ca_server_name: Option<String>,

    /// Trust roots for the CA's serving certificate, also trusted for HBONE peers (PEM)
    #[arg(long, value_name = "FILE", default_value = waystone_proxy::hbone::istio_ca::DEFAULT_ROOT_CERT)]
    pub ca_root_cert: PathBuf,

    /// The pod's projected service-account token with audience istio-ca (re-read at each
    /// request: kubelet rotates it)
    #[arg(long, value_name = "FILE", default_value = waystone_proxy::hbone::istio_ca::DEFAULT_TOKEN_FILE)]
    pub ca_token_file: PathBuf,

    /// Sent to the CA as the ClusterID header
    #[arg(long, env = "CLUSTER_ID", value_name = "NAME", default_value = waystone_proxy::hbone::istio_ca::DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,

    /// Requested certificate lifetime (the CA may shorten it)
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_positive_duration)]
    pub cert_ttl: Duration,

    /// Renew once this fraction of the certificate's lifetime has passed (Istio's
    /// SECRET_GRACE_PERIOD_RATIO)
    #[arg(long, env = "SECRET_GRACE_PERIOD_RATIO", value_name = "RATIO", default_value_t = waystone_proxy::hbone::istio_ca::DEFAULT_GRACE_RATIO)]
    pub cert_grace_ratio: f64,

    /// The pod's namespace, for the SPIFFE identity [default: the gateway's namespace]
    #[arg(long, env = "POD_NAMESPACE", value_name = "NS")]
    pub pod_namespace: Option<String>,

    /// The pod's service account, for the SPIFFE identity [default: <gateway>-waystone, the one
    /// the controller creates]
    #[arg(long, env = "SERVICE_ACCOUNT", value_name = "NAME")]
    pub service_account: Option<String>,

    /// HBONE identity from files (PEM certificate chain; needs --hbone-key and --hbone-roots),
    /// reloaded when they change
    #[arg(long, value_name = "FILE", requires_all = ["hbone_key", "hbone_roots"])]
    pub hbone_cert: Option<PathBuf>,

    /// The private key for --hbone-cert (PEM)
    #[arg(long, value_name = "FILE", requires = "hbone_cert")]
    pub hbone_key: Option<PathBuf>,

    /// Trust roots HBONE peers must chain to (PEM)
    #[arg(long, value_name = "FILE", requires = "hbone_cert")]
    pub hbone_roots: Option<PathBuf>,

    /// SPIFFE trust domain of this workload and its HBONE peers
    #[arg(
        long,
        env = "TRUST_DOMAIN",
        value_name = "DOMAIN",
        default_value = "cluster.local"
    )]
    pub trust_domain: String,

    /// An endpoint reached through HBONE: IP (its ztunnel at IP:15008) or ENDPOINT=TUNNEL
    /// (both IP:PORT); repeatable
    #[arg(long = "hbone-endpoint", value_name = "IP|ENDPOINT=TUNNEL")]
    pub hbone_endpoints: Vec<String>,
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err("must be longer than zero".into()),
        d => Ok(d),
    }
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A manifest file, a directory of .yaml/.yml/.json files, or '-' for stdin; repeatable
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub filenames: Vec<String>,

    /// Namespace for objects that name none
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Yaml,
    Json,
    Wide,
    Name,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// The resource kind (wasmplugin, gateway, svc, httproute.gateway.networking.k8s.io, ...),
    /// or KIND/NAME
    #[arg(value_name = "KIND")]
    pub kind: String,

    /// Names to show (all when none), or more KIND/NAME pairs
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,

    /// The namespace [default: default]
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,

    /// List the objects of every namespace
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,

    /// Output format
    #[arg(short, long, value_enum, value_name = "FORMAT")]
    pub output: Option<OutputFormat>,

    /// Label selector: key=value, key!=value, key, !key; comma-separated terms must all match
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    pub selector: Option<String>,

    /// Add a LABELS column to tables
    #[arg(long)]
    pub show_labels: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The resource kind, or KIND/NAME
    #[arg(value_name = "KIND", required_unless_present = "filenames")]
    pub kind: Option<String>,

    /// Names of the objects to delete
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,

    /// Delete the objects a manifest file, directory or stdin ('-') describes
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        conflicts_with = "kind"
    )]
    pub filenames: Vec<String>,

    /// The namespace [default: default]
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct LabelArgs {
    /// The resource kind, or KIND/NAME
    #[arg(value_name = "KIND")]
    pub kind: String,

    /// Object names, then label changes: key=value sets, key- removes
    #[arg(value_name = "NAME|KEY=VAL|KEY-", required = true)]
    pub args: Vec<String>,

    /// Allow replacing the value of a label that is already set
    #[arg(long)]
    pub overwrite: bool,

    /// The namespace [default: default]
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum WaypointCommand {
    /// Apply a waypoint (a Gateway of class istio-waypoint)
    Apply(WaypointApplyArgs),
    /// List waypoints
    List(WaypointListArgs),
    /// Delete waypoints by name, or all of a namespace
    Delete(WaypointDeleteArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrafficType {
    Service,
    Workload,
    All,
    None,
}

impl TrafficType {
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficType::Service => "service",
            TrafficType::Workload => "workload",
            TrafficType::All => "all",
            TrafficType::None => "none",
        }
    }
}

#[derive(Debug, Args)]
pub struct WaypointApplyArgs {
    /// The namespace [default: default]
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,

    /// Name of the waypoint ('none' is reserved)
    #[arg(long, value_name = "NAME", default_value = "waypoint")]
    pub name: String,

    /// The traffic the waypoint handles (sets the istio.io/waypoint-for label)
    #[arg(long = "for", value_enum, value_name = "TYPE")]
    pub for_traffic: Option<TrafficType>,

    /// Label the namespace istio.io/use-waypoint=<name>
    #[arg(long)]
    pub enroll_namespace: bool,

    /// Replace the waypoint the namespace already uses
    #[arg(long)]
    pub overwrite: bool,

    /// Wait until the waypoint is programmed
    #[arg(short, long)]
    pub wait: bool,

    /// How long --wait waits (30s, 2m, 1m30s)
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub waypoint_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct WaypointListArgs {
    /// The namespace [default: default]
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,

    /// List the waypoints of every namespace
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

#[derive(Debug, Args)]
pub struct WaypointDeleteArgs {
    /// Waypoints to delete
    #[arg(
        value_name = "NAME",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub names: Vec<String>,

    /// Delete every waypoint of the namespace
    #[arg(long)]
    pub all: bool,

    /// The namespace [default: default]
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// Istio's OCI layout: a raw module layer with a Wasm config
    Oci,
    /// One tar+gzip layer holding plugin.wasm
    Compat,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The module to push
    #[arg(value_name = "FILE.wasm")]
    pub file: PathBuf,

    /// Where to: oci://REGISTRY/REPO:TAG
    #[arg(value_name = "oci://REGISTRY/REPO:TAG")]
    pub target: String,

    /// Allow plain HTTP (and unverified TLS) to the registry
    #[arg(long)]
    pub insecure: bool,

    /// Image layout
    #[arg(long, value_enum, default_value = "oci")]
    pub layout: Layout,

    /// Registry user name
    #[arg(
        long,
        env = "WAYSTONE_REGISTRY_USERNAME",
        value_name = "USER",
        requires = "password"
    )]
    pub username: Option<String>,

    /// Registry password
    #[arg(
        long,
        env = "WAYSTONE_REGISTRY_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Run Istio's bookinfo services (productpage, reviews, details, ratings) on loopback
    Bookinfo(BookinfoArgs),
}

#[derive(Debug, Args)]
pub struct BookinfoArgs {
    /// Address the four services bind to (each on a free port)
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub address: IpAddr,

    /// Where to write the Service and EndpointSlice manifests [default: <data-dir>/bookinfo.yaml]
    #[arg(long, value_name = "FILE")]
    pub manifests: Option<PathBuf>,

    /// Namespace of the services
    #[arg(short, long, value_name = "NS", default_value = "default")]
    pub namespace: String,

    /// Also apply the manifests through the running 'waystone up'
    #[arg(long)]
    pub apply: bool,
}

impl Cli {
    /// Parses a command line. A command missing its subcommand is a usage error like any
    /// other, not a help page: errors stay one line.
    pub fn parse_args<I, T>(argv: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        fn no_help_on_missing(cmd: clap::Command) -> clap::Command {
            let cmd = cmd.arg_required_else_help(false);
            let names: Vec<String> = cmd
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .collect();
            names.iter().fold(cmd, |cmd, name| {
                cmd.mut_subcommand(name, no_help_on_missing)
            })
        }
        let matches = no_help_on_missing(Cli::command()).try_get_matches_from(argv)?;
        Cli::from_arg_matches(&matches)
    }
}

/// Go-style durations as istioctl takes them: `90s`, `2m`, `1m30s`, `500ms`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (examples: 30s, 2m, 1m30s)");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(bad()),
        };
        total += unit;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::parse_args(std::iter::once("waystone").chain(args.iter().copied()))
    }

    fn err(args: &[&str]) -> ErrorKind {
        parse(args).expect_err("should not parse").kind()
    }

    #[test]
    fn definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn cache_commands() {
        assert!(matches!(
            parse(&["cache", "list"]).unwrap().command,
            Command::Cache(CacheCommand::List)
        ));
        let Command::Cache(CacheCommand::Prune(p)) = parse(&["cache", "prune"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(p.unused_for, Duration::from_secs(24 * 3600));
        let Command::Cache(CacheCommand::Prune(p)) =
            parse(&["cache", "prune", "--unused-for", "1h30m"])
                .unwrap()
                .command
        else {
            panic!()
        };
        assert_eq!(p.unused_for, Duration::from_secs(5400));
        assert_eq!(
            err(&["cache", "prune", "--unused-for", "soon"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(err(&["cache", "list", "extra"]), ErrorKind::UnknownArgument);
        assert_eq!(err(&["cache"]), ErrorKind::MissingSubcommand);
    }

    #[test]
    fn up_defaults_and_flags() {
        let Command::Up(up) = parse(&["up"]).unwrap().command else {
            panic!()
        };
        assert!(up.insecure_registries.is_empty());
        assert_eq!(up.gateway_address.to_string(), "127.0.0.1");
        assert_eq!(up.entry_address.to_string(), "127.0.0.1:15001");
        assert_eq!(up.api_address.to_string(), "127.0.0.1:0");
        assert_eq!(up.workers, None);

        let cli = parse(&[
            "--data-dir",
            "/tmp/d",
            "up",
            "--insecure-registry",
            "localhost:5000",
            "--insecure-registry",
            "reg:5001",
            "--gateway-address",
            "127.0.1.1",
            "--entry-address",
            "127.0.2.1:15001",
            "--api-address",
            "127.0.0.1:9999",
            "--workers",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.data_dir, Some(PathBuf::from("/tmp/d")));
        let Command::Up(up) = cli.command else {
            panic!()
        };
        assert_eq!(up.insecure_registries, ["localhost:5000", "reg:5001"]);
        assert_eq!(up.gateway_address.to_string(), "127.0.1.1");
        assert_eq!(up.workers, Some(3));
    }

    #[test]
    fn up_rejects_bad_values() {
        assert_eq!(
            err(&["up", "--gateway-address", "nope"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            err(&["up", "--entry-address", "127.0.0.1"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(err(&["up", "--workers", "0"]), ErrorKind::ValueValidation);
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&["get", "svc", "--data-dir", "/x", "-v"]).unwrap();
        assert_eq!(cli.data_dir, Some(PathBuf::from("/x")));
        assert!(cli.verbose);
    }

    #[test]
    fn apply_needs_a_file() {
        let Command::Apply(a) = parse(&["apply", "-f", "a.yaml", "-f", "-", "-n", "ns1"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(a.filenames, ["a.yaml", "-"]);
        assert_eq!(a.namespace.as_deref(), Some("ns1"));
        assert_eq!(err(&["apply"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(err(&["apply", "-f"]), ErrorKind::InvalidValue);
    }

    #[test]
    fn get_flags() {
        let Command::Get(g) = parse(&[
            "get",
            "wasmplugin",
            "a",
            "b",
            "-n",
            "x",
            "-o",
            "yaml",
            "-l",
            "app=r",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(g.kind, "wasmplugin");
        assert_eq!(g.names, ["a", "b"]);
        assert_eq!(g.output, Some(OutputFormat::Yaml));
        assert_eq!(g.selector.as_deref(), Some("app=r"));
        let Command::Get(g) = parse(&["get", "gtw", "-A", "-o", "wide"]).unwrap().command else {
            panic!()
        };
        assert!(g.all_namespaces);
        assert_eq!(g.output, Some(OutputFormat::Wide));
        assert_eq!(err(&["get"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(err(&["get", "svc", "-o", "table"]), ErrorKind::InvalidValue);
    }

    #[test]
    fn delete_by_name_or_file() {
        let Command::Delete(d) = parse(&["delete", "wasmplugin", "a", "b"]).unwrap().command else {
            panic!()
        };
        assert_eq!(d.kind.as_deref(), Some("wasmplugin"));
        assert_eq!(d.names, ["a", "b"]);
        let Command::Delete(d) = parse(&["delete", "-f", "x.yaml"]).unwrap().command else {
            panic!()
        };
        assert_eq!(d.filenames, ["x.yaml"]);
        assert_eq!(err(&["delete"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            err(&["delete", "svc", "-f", "x.yaml"]),
            ErrorKind::ArgumentConflict
        );
    }

    #[test]
    fn label_takes_removals() {
        let Command::Label(l) = parse(&["label", "service", "reviews", "a=b", "c-", "--overwrite"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(l.kind, "service");
        assert_eq!(l.args, ["reviews", "a=b", "c-"]);
        assert!(l.overwrite);
        assert_eq!(
            err(&["label", "service"]),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn waypoint_commands() {
        let Command::Waypoint(WaypointCommand::Apply(a)) =
            parse(&["waypoint", "apply"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(a.name, "waypoint");
        assert_eq!(a.for_traffic, None);
        assert_eq!(a.waypoint_timeout, Duration::from_secs(30));
        assert!(!a.wait && !a.enroll_namespace && !a.overwrite);
        let Command::Waypoint(WaypointCommand::Apply(a)) = parse(&[
            "waypoint",
            "apply",
            "-n",
            "bookinfo",
            "--name",
            "reviews-svc-waypoint",
            "--for",
            "service",
            "--enroll-namespace",
            "--overwrite",
            "--wait",
            "--waypoint-timeout",
            "1m30s",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(a.namespace.as_deref(), Some("bookinfo"));
        assert_eq!(a.for_traffic, Some(TrafficType::Service));
        assert_eq!(a.waypoint_timeout, Duration::from_secs(90));
        assert_eq!(
            err(&["waypoint", "apply", "--for", "pods"]),
            ErrorKind::InvalidValue
        );
        assert_eq!(err(&["waypoint"]), ErrorKind::MissingSubcommand);

        let Command::Waypoint(WaypointCommand::List(l)) =
            parse(&["waypoint", "list", "-A"]).unwrap().command
        else {
            panic!()
        };
        assert!(l.all_namespaces);
        let Command::Waypoint(WaypointCommand::Delete(d)) =
            parse(&["waypoint", "delete", "a", "b", "-n", "x"])
                .unwrap()
                .command
        else {
            panic!()
        };
        assert_eq!(d.names, ["a", "b"]);
        assert!(parse(&["waypoint", "delete", "--all"]).is_ok());
        assert_eq!(
            err(&["waypoint", "delete"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err(&["waypoint", "delete", "a", "--all"]),
            ErrorKind::ArgumentConflict
        );
    }

    #[test]
    fn push_flags() {
        let Command::Push(p) = parse(&[
            "push",
            "m.wasm",
            "oci://localhost:5000/r:1",
            "--insecure",
            "--layout",
            "compat",
            "--username",
            "u",
            "--password",
            "p",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(p.file, PathBuf::from("m.wasm"));
        assert_eq!(p.target, "oci://localhost:5000/r:1");
        assert!(p.insecure);
        assert_eq!(p.layout, Layout::Compat);
        assert_eq!(p.username.as_deref(), Some("u"));
        assert_eq!(err(&["push", "m.wasm"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            err(&["push", "m.wasm", "oci://r/x", "--layout", "docker"]),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn demo_bookinfo_flags() {
        let Command::Demo(DemoCommand::Bookinfo(b)) = parse(&["demo", "bookinfo"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(b.address.to_string(), "127.0.0.1");
        assert_eq!(b.namespace, "default");
        assert!(!b.apply && b.manifests.is_none());
        let Command::Demo(DemoCommand::Bookinfo(b)) = parse(&[
            "demo",
            "bookinfo",
            "--apply",
            "--address",
            "127.0.3.100",
            "--manifests",
            "/tmp/b.yaml",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert!(b.apply);
        assert_eq!(b.manifests, Some(PathBuf::from("/tmp/b.yaml")));
        assert_eq!(err(&["demo", "bookstore"]), ErrorKind::InvalidSubcommand);
    }

    #[test]
    fn unknown_command_is_an_error() {
        assert_eq!(err(&["exec", "svc"]), ErrorKind::InvalidSubcommand);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h2m3s"), Ok(Duration::from_secs(3723)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "s", "10", "10x", "m5", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
