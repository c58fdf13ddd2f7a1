//! `waystone apply -f FILE|DIR|-`: one apply request per source, kubectl's lines back.

use waystone_control::api::ApplyRequest;

use super::{DEFAULT_NAMESPACE, Failures, print_apply_results, read_sources};
use crate::args::ApplyArgs;
use crate::client::ApiClient;
use crate::{CliError, CliResult};

pub async fn run(client: &ApiClient, args: ApplyArgs) -> CliResult {
    let namespace = args.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let sources: Vec<_> = read_sources(&args.filenames)?
        .into_iter()
        .filter(|s| !s.text.trim().is_empty())
        .collect();
    if sources.is_empty() {
        return Err(CliError::Failed("no objects passed to apply".into()));
    }
    let mut failures = Failures::default();
    // Like kubectl, one bad file does not stop the others; the exit status tells.
    for source in sources {
        let req = ApplyRequest {
            manifests: source.text,
            source: source.name,
            default_namespace: namespace.clone(),
        };
        match client.apply(&req).await {
            Ok(resp) => print_apply_results(&resp),
            // kubectl's words for a lost optimistic-concurrency race.
            Err(crate::client::ClientError::Api { status, message })
                if status == reqwest::StatusCode::CONFLICT =>
            {
                eprintln!("Error from server (Conflict): {message}");
                failures.0 = true;
            }
            Err(e) => failures.record(e)?,
        }
    }
    failures.finish()
}
