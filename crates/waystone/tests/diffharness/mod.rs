//! The differential harness: the same plugin module, the same configuration
//! and the same requests through Envoy (the oracle) and through Waystone;
//! status, headers, body, trailers and the plugin's log lines compared.
//! How to add a plugin and its corpus: docs/differential.md.

pub mod client;
pub mod corpus;
pub mod echo;
pub mod envoy;
pub mod tcp;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use client::Response;
use corpus::{Case, Corpus, Expect, Harness};
use envoy::LogLine;

/// One proxy as the harness sees it for one plugin.
pub struct Side<'a> {
    pub addr: String,
    /// The plugin's log lines so far, oldest first.
    pub logs: Box<dyn Fn() -> Vec<LogLine> + 'a>,
    /// How many fence lines have been consumed.
    fences: usize,
    /// Index into `logs()` where the next case's lines start.
    cursor: usize,
}

impl<'a> Side<'a> {
    pub fn new(addr: String, logs: Box<dyn Fn() -> Vec<LogLine> + 'a>, fence: &str) -> Self {
        let lines = logs();
        let fences = lines.iter().filter(|l| l.message == fence).count();
        let cursor = lines.len();
        Self {
            addr,
            logs,
            fences,
            cursor,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub response: Response,
    pub logs: Vec<LogLine>,
}

const FENCE_WAIT: Duration = Duration::from_secs(4);
/// Plain requests per plugin before the first case, so every worker has
/// created and configured its instance (Waystone creates them on first use,
/// Envoy at start): root-context lines never land in a case's window.
const WARM_UP: usize = 4;
const EVENTUALLY: Duration = Duration::from_secs(5);

/// Sends one request and collects the plugin's log lines up to its fence.
fn exchange(side: &mut Side<'_>, corpus: &Corpus, case: &Case) -> Result<Outcome, String> {
    let response = client::send(&side.addr, &case.request)?;
    side.fences += 1;
    let deadline = Instant::now() + FENCE_WAIT;
    let (lines, end) = loop {
        let lines = (side.logs)();
        let mut seen = 0;
        let found = lines.iter().position(|l| {
            if l.message == corpus.log_fence {
                seen += 1;
            }
            seen == side.fences
        });
        if let Some(end) = found {
            break (lines, end);
        }
        if Instant::now() > deadline {
            // Keep the fence count honest for the next case.
            side.fences = lines
                .iter()
                .filter(|l| l.message == corpus.log_fence)
                .count();
            side.cursor = lines.len();
            return Err(format!(
                "the plugin never logged its fence {:?} within {FENCE_WAIT:?} (status {})",
                corpus.log_fence, response.status
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let logs = lines[side.cursor.min(end)..end]
        .iter()
        .filter(|l| {
            !corpus
                .ignore_logs
                .iter()
                .any(|p| l.message.starts_with(p.as_str()))
        })
        .cloned()
        .collect();
    side.cursor = end + 1;
    Ok(Outcome { response, logs })
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// What `expect` finds wrong with an outcome (empty: all holds).
fn check(expect: &Expect, o: &Outcome) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(s) = expect.status
        && o.response.status != s
    {
        out.push(format!("status {} (expected {s})", o.response.status));
    }
    for (k, v) in &expect.headers {
        let got = header(&o.response, k);
        if got != Some(v.as_str()) {
            out.push(format!("header {k}: {got:?} (expected {v:?})"));
        }
    }
    let body = String::from_utf8_lossy(&o.response.body);
    for needle in &expect.body_contains {
        if !body.contains(needle.as_str()) {
            out.push(format!("body lacks {needle:?}"));
        }
    }
    for needle in &expect.logs_contain {
        if !o.logs.iter().any(|l| l.message.contains(needle.as_str())) {
            out.push(format!("no log line contains {needle:?}"));
        }
    }
    out
}

fn run_on(side: &mut Side<'_>, corpus: &Corpus, case: &Case) -> Result<Outcome, String> {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let o = exchange(side, corpus, case)?;
        let wrong = case
            .expect
            .as_ref()
            .map(|e| check(e, &o))
            .unwrap_or_default();
        if wrong.is_empty() || !case.eventually || Instant::now() > deadline {
            return Ok(o);
        }
    }
}

fn comparable_headers(r: &Response, h: &Harness) -> Vec<String> {
    // content-length and transfer-encoding are framing: equal bodies are
    // compared directly, however each proxy chose to frame them.
    let mut v: Vec<String> = r
        .headers
        .iter()
        .filter(|(k, _)| {
            k != "content-length"
                && k != "transfer-encoding"
                && !h.ignored_response_headers.contains(k)
        })
        .map(|(k, v)| format!("{k}: {v}"))
        .chain(r.trailers.iter().map(|(k, v)| format!("trailer {k}: {v}")))
        .collect();
    v.sort();
    v
}

fn show_logs(l: &[LogLine]) -> String {
    l.iter()
        .map(|l| format!("\n      [{}] {}", l.level, l.message))
        .collect()
}

/// The parts that differ, each with both sides shown; `tolerated` gets the
/// pending host fixes that explained a difference.
fn compare(
    h: &Harness,
    envoy: &Outcome,
    ws: &Outcome,
    tolerated: &mut Vec<String>,
) -> Vec<(&'static str, String)> {
    let mut d = Vec::new();
    if envoy.response.status != ws.response.status {
        d.push((
            "status",
            format!(
                "envoy {} / waystone {}",
                envoy.response.status, ws.response.status
            ),
        ));
    }
    let (mut eh, wh) = (
        comparable_headers(&envoy.response, h),
        comparable_headers(&ws.response, h),
    );
    for fix in &h.pending_host_fixes {
        if eh.contains(&fix.envoy_only_header) && !wh.contains(&fix.envoy_only_header) {
            eh.retain(|x| x != &fix.envoy_only_header);
            tolerated.push(fix.name.clone());
        }
    }
    if eh != wh {
        let only_e: Vec<_> = eh.iter().filter(|x| !wh.contains(x)).collect();
        let only_w: Vec<_> = wh.iter().filter(|x| !eh.contains(x)).collect();
        d.push((
            "headers",
            format!("only envoy {only_e:?} / only waystone {only_w:?}"),
        ));
    }
    if envoy.response.body != ws.response.body {
        d.push((
            "body",
            format!(
                "\n    envoy:    {:?}\n    waystone: {:?}",
                String::from_utf8_lossy(&envoy.response.body),
                String::from_utf8_lossy(&ws.response.body)
            ),
        ));
    }
    if envoy.logs != ws.logs {
        d.push((
            "logs",
            format!(
                "\n    envoy:{}\n    waystone:{}",
                show_logs(&envoy.logs),
                show_logs(&ws.logs)
            ),
        ));
    }
    d
}

/// The run's findings, printed and judged at the end.
#[derive(Default)]
pub struct Report {
    pub passed: usize,
    pub known: usize,
    pub skipped: Vec<String>,
    pub failures: Vec<String>,
    /// Pending host fixes that explained a difference, once per case.
    pub tolerated: Vec<String>,
    pub text: String,
}

/// Plain requests (no `x-test`) until each worker has its instance; stops at
/// the first stream without a fence (a plugin that does not load).
fn warm_up(side: &mut Side<'_>, corpus: &Corpus) {
    let plain = Case {
        name: "warm-up".into(),
        requires: vec![],
        request: corpus::Request {
            method: "GET".into(),
            path: "/warm-up".into(),
            headers: vec![],
            body: None,
            trailers: vec![],
        },
        expect: None,
        eventually: false,
        differs: None,
    };
    for _ in 0..WARM_UP {
        if exchange(side, corpus, &plain).is_err() {
            break;
        }
    }
}

/// Runs a corpus's cases through both sides, in order (state such as shared
/// data evolves the same way in both).
pub fn run_corpus(
    h: &Harness,
    corpus: &Corpus,
    envoy: &mut Side<'_>,
    ws: &mut Side<'_>,
    report: &mut Report,
) {
    warm_up(envoy, corpus);
    warm_up(ws, corpus);
    for case in &corpus.cases {
        let id = format!("{}/{}", corpus.plugin, case.name);
        let missing: Vec<&String> = case
            .requires
            .iter()
            .filter(|r| h.missing_features.contains(r))
            .collect();
        if !missing.is_empty() {
            let _ = writeln!(
                report.text,
                "SKIP {id}: needs {missing:?} (missing_features in harness.yaml)"
            );
            report.skipped.push(format!("{id} needs {missing:?}"));
            continue;
        }
        let e = run_on(envoy, corpus, case);
        let w = run_on(ws, corpus, case);
        judge(
            report,
            &id,
            (e, w),
            |o| case.expect.as_ref().map_or_else(Vec::new, |x| check(x, o)),
            |e, w| {
                let mut tolerated = Vec::new();
                let diffs = compare(h, e, w, &mut tolerated);
                (diffs, tolerated)
            },
            case.differs.as_ref(),
        );
    }
}

/// Records the verdict on one case from both proxies' outcomes: a run that failed, an
/// `expect` either proxy breaks, a difference not marked `differs` (or a `differs` mark on a
/// case that now agrees) fail it; marked differences make it KNOWN. `compare` returns the
/// differences and the ones tolerated pending a host fix. Shared by the HTTP and TCP cases.
pub(crate) fn judge<O>(
    report: &mut Report,
    id: &str,
    (e, w): (Result<O, String>, Result<O, String>),
    check: impl Fn(&O) -> Vec<String>,
    compare: impl FnOnce(&O, &O) -> (Vec<(&'static str, String)>, Vec<String>),
    differs: Option<&corpus::Differs>,
) {
    let mut problems = Vec::new();
    let (e, w) = match (e, w) {
        (Ok(e), Ok(w)) => (e, w),
        (e, w) => {
            for (name, r) in [("envoy", &e), ("waystone", &w)] {
                if let Err(msg) = r {
                    problems.push(format!("{name}: {msg}"));
                }
            }
            let _ = writeln!(report.text, "FAIL {id}: {}", problems.join("; "));
            report
                .failures
                .push(format!("{id}: {}", problems.join("; ")));
            return;
        }
    };
    for (name, o) in [("envoy", &e), ("waystone", &w)] {
        let wrong = check(o);
        if !wrong.is_empty() {
            problems.push(format!("{name} breaks expect: {}", wrong.join(", ")));
        }
    }
    let (diffs, tolerated) = compare(&e, &w);
    for t in tolerated {
        let _ = writeln!(report.text, "  (tolerated pending host fix: {t})");
        report.tolerated.push(format!("{id}: {t}"));
    }
    let allowed = differs.map(|d| d.parts.clone()).unwrap_or_default();
    if let Some(d) = differs
        && diffs.is_empty()
    {
        problems.push(format!(
            "marked `differs` ({}) but both proxies now agree: drop the mark and its entry in docs/compat-differences.md",
            d.reason
        ));
    }
    for (part, detail) in diffs
        .iter()
        .filter(|(p, _)| !allowed.iter().any(|a| a == p))
    {
        problems.push(format!("{part} differ: {detail}"));
    }
    if problems.is_empty() {
        if diffs.is_empty() {
            report.passed += 1;
            let _ = writeln!(report.text, "ok   {id}");
        } else {
            report.known += 1;
            let parts: Vec<_> = diffs.iter().map(|(p, _)| *p).collect();
            let reason = differs.map_or("", |d| d.reason.as_str());
            let _ = writeln!(
                report.text,
                "KNOWN {id}: {parts:?} differ as documented ({reason})"
            );
        }
    } else {
        let _ = writeln!(report.text, "FAIL {id}:\n  {}", problems.join("\n  "));
        report
            .failures
            .push(format!("{id}: {}", problems.join("; ")));
    }
}
