//! Changes under load: plugins re-applied, swapped, deleted and re-added a hundred times while
//! clients keep sending; nothing fails but what the plugins answer themselves, and no instance
//! or file descriptor is left behind. Graceful shutdown lets in-flight requests finish.
//!
//! One test per concern, in this file only, because the instance count is process-wide.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::*;
use waystone_proxy::RuntimeConfig;
use waystone_wasm::PluginInstance;

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_plugin_changes_under_load_fail_nothing_and_leak_nothing() {
    let ip = net(4);
    let backend = Backend::start(ip).await;
    let engine = engine(Duration::from_secs(1), 64 << 20);
    let misbehave = compile(&engine, &plugin_wasm("misbehave"));
    let noop = compile(&engine, &plugin_wasm("noop"));
    let dp = dataplane(ip, 2).await;
    let with_plugin =
        |config: &str| manifests(backend.addr, &[("gw", 18080, Some(("FAIL_CLOSE", config)))]);
    let without_plugin = manifests(backend.addr, &[("gw", 18080, None)]);
    let addr = apply(
        &dp,
        runtime(&with_plugin("{tag: v0}"), |_| misbehave.clone()),
        "gw",
    )
    .await;

    let c = client();
    assert_eq!(send(&c, addr, "/", &[]).await.status, 200);
    let fds_before = open_fds();

    // Steady load: four clients, each on its own keep-alive connection, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            let (stop, done) = (stop.clone(), done.clone());
            tokio::spawn(async move {
                let c = client();
                let mut bad = Vec::new();
                let mut answered = [0u64; 2]; // upstream, plugin's own reply
                while !stop.load(Ordering::Relaxed) {
                    let a = send(&c, addr, "/", &[]).await;
                    match a.status {
                        200 => answered[0] += 1,
                        418 if a.body == "misbehave says no\n" => answered[1] += 1,
                        _ => bad.push((a.status, a.body)),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                (answered, bad)
            })
        })
        .collect();

    let started = Instant::now();
    let mut changes = 0;
    for i in 0..100u32 {
        let rt: RuntimeConfig = match i % 5 {
            // New configuration of the same module.
            0 => runtime(&with_plugin(&format!("{{tag: v{i}}}")), |_| {
                misbehave.clone()
            }),
            // The plugin answers by itself for a while.
            1 => runtime(&with_plugin("{mode: reply}"), |_| misbehave.clone()),
            // A new module.
            2 => runtime(&with_plugin("{}"), |_| noop.clone()),
            // Deleted, then re-added.
            3 => runtime(&without_plugin, |_| unreachable!("no plugin")),
            _ => runtime(&with_plugin(&format!("{{tag: back{i}}}")), |_| {
                misbehave.clone()
            }),
        };
        dp.apply(rt).await;
        changes += 1;
        // Let some requests run on each configuration.
        let seen = done.load(Ordering::Relaxed);
        wait_for("requests to flow", Duration::from_secs(10), || {
            done.load(Ordering::Relaxed) >= seen + 4
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut upstream, mut replies) = (0, 0);
    for l in loaders {
        let (answered, bad) = l.await.unwrap();
        assert!(bad.is_empty(), "failed requests under churn: {bad:?}");
        upstream += answered[0];
        replies += answered[1];
    }
    eprintln!(
        "{changes} changes in {:?}; {upstream} upstream answers, {replies} plugin replies, 0 failures",
        started.elapsed()
    );
    assert!(upstream > 0 && replies > 0);

    // Only the current configuration's instances live: one per worker that ran it.
    dp.apply(runtime(&with_plugin("{tag: last}"), |_| misbehave.clone()))
        .await;
    let live_plugin = || PluginInstance::live_instances();
    wait_for(
        "stale instances to be dropped",
        Duration::from_secs(5),
        || live_plugin() <= 2,
    )
    .await;
    dp.apply(runtime(&without_plugin, |_| unreachable!())).await;
    wait_for(
        "every instance to be dropped",
        Duration::from_secs(5),
        || live_plugin() == 0,
    )
    .await;
    // The clients are gone, so are their connections. What may remain are the proxy's idle
    // upstream connections (both ends live in this process): at most one per loader per
    // worker. A leak per change would show as hundreds.
    drop(c);
    let allowed = fds_before + 2 * 4 * 2;
    wait_for("connections to close", Duration::from_secs(5), || {
        open_fds() <= allowed
    })
    .await;
    eprintln!(
        "fds: {fds_before} before, {} after {changes} changes",
        open_fds()
    );
    dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_and_refuses_new_ones() {
    let ip = net(5);
    let backend = Backend::start(ip).await;
    let dp = Arc::new(dataplane(ip, 1).await);
    let addr = apply(
        &dp,
        runtime(
            &manifests(backend.addr, &[("gw", 18080, None)]),
            |_| unreachable!(),
        ),
        "gw",
    )
    .await;
    let c = client();
    let slow = {
        let c = c.clone();
        tokio::spawn(async move { send(&c, addr, "/slow", &[]).await })
    };
    // The slow request is in flight once the backend holds it.
    wait_for("/slow to reach the backend", Duration::from_secs(5), || {
        backend.arrivals() == 1
    })
    .await;
    assert_eq!(backend.hits(), 0, "the backend is still holding /slow");
    let started = Instant::now();
    let stopping = {
        let dp = dp.clone();
        tokio::spawn(async move { dp.shutdown(Duration::from_secs(10)).await })
    };
    wait_for("the listener to close", Duration::from_secs(5), || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    let a = slow.await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "GET /slow"));
    stopping.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited for the in-flight request only: {:?}",
        started.elapsed()
    );
}
