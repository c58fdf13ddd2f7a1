//! The `waystone` command line: kubectl- and istioctl-shaped commands over the local API,
//! `up` (the whole control and data plane), `push`, and `demo bookinfo`. See ARCHITECTURE.md.
//!
//! Every failure ends as one line on stderr, `error: <what and why>`, and exit status 1.

pub mod args;
pub mod client;
mod commands;
pub mod demo;
pub mod table;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::error::ErrorKind;
use tracing_subscriber::EnvFilter;

use crate::args::{Cli, Command};

/// What a command's failure looks like once it has printed what it could.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A failure to report as `error: ...`.
    #[error("{0}")]
    Failed(String),
    /// The command already printed its errors (e.g. one per missing object); just exit 1.
    #[error("some operations failed")]
    Reported,
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Failed(client::one_line(&format!("{e:#}")))
    }
}

impl From<client::ClientError> for CliError {
    fn from(e: client::ClientError) -> Self {
        CliError::Failed(e.to_string())
    }
}

pub type CliResult<T = ()> = Result<T, CliError>;

/// Runs the command line of this process.
pub fn main() -> ExitCode {
    run(std::env::args_os())
}

/// Runs a command line (`argv[0]` first), printing to stdout/stderr.
pub fn run<I, T>(argv: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::parse_args(argv) {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e),
    };
    init_logging(&cli);
    let data_dir = waystone_control::paths::resolve_data_dir(cli.data_dir.clone());
    match commands::run(cli.command, &data_dir, cli.kubeconfig.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Failed(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
        Err(CliError::Reported) => ExitCode::FAILURE,
    }
}

/// Help and version go to stdout with success; usage errors become our one error line.
fn clap_exit(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // clap writes help to stdout, colored only on a terminal.
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{}", clap_error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Folds clap's multi-line report (message, tips, usage) into one line, without the usage.
pub fn clap_error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut line = String::new();
    for part in text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| !l.is_empty())
    {
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    if !line.starts_with("error: ") {
        line.insert_str(0, "error: ");
    }
    line
}

/// How the admin endpoint's `/logging` replaces the filter, set once logging is up.
static LOG_CONTROL: std::sync::OnceLock<waystone_control::admin::LogControl> =
    std::sync::OnceLock::new();

pub(crate) fn log_control() -> Option<waystone_control::admin::LogControl> {
    LOG_CONTROL.get().cloned()
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let default = match (&cli.command, cli.verbose) {
        (_, true) => "debug",
        (Command::Up(_) | Command::Controller(_) | Command::Proxy(_), false) => "info",
        (_, false) => "warn",
    };
    let initial = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| EnvFilter::try_new(v).is_ok())
        .unwrap_or_else(|| default.to_string());
    // A reloadable filter, so the admin endpoint can change levels while `up` runs.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(EnvFilter::new(&initial));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = LOG_CONTROL.set(waystone_control::admin::LogControl {
            set_filter: std::sync::Arc::new(move |directives: &str| {
                let filter = EnvFilter::try_new(directives)
                    .map_err(|e| format!("invalid log filter {directives:?}: {e}"))?;
                handle
                    .reload(filter)
                    .map_err(|e| format!("cannot change the log filter: {e}"))
            }),
            initial,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(args: &[&str]) -> String {
        let e =
            Cli::parse_args(std::iter::once("waystone").chain(args.iter().copied())).unwrap_err();
        clap_error_line(&e)
    }

    #[test]
    fn usage_errors_fit_on_one_line() {
        let l = line(&["get"]);
        assert!(!l.contains('\n'), "{l}");
        assert_eq!(
            l,
            "error: the following required arguments were not provided: <KIND>"
        );
        let l = line(&["waypoint", "apply", "--fro", "service"]);
        assert!(
            l.starts_with("error: unexpected argument '--fro' found"),
            "{l}"
        );
        assert!(!l.contains('\n') && !l.contains("Usage"), "{l}");
        let l = line(&["waypoint"]);
        assert!(
            l.starts_with("error: 'waystone waypoint' requires a subcommand"),
            "{l}"
        );
        assert!(!l.contains('\n'), "{l}");
    }

    #[test]
    fn failures_exit_1() {
        assert_eq!(run(["waystone", "get"]), ExitCode::FAILURE);
        let help = Cli::parse_args(["waystone", "--help"]).unwrap_err();
        assert_eq!(help.kind(), ErrorKind::DisplayHelp);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        // No `waystone up` behind this data directory.
        assert_eq!(
            run(["waystone", "--data-dir", d, "get", "svc"]),
            ExitCode::FAILURE
        );
    }
}
