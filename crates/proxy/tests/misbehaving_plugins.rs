//! Plugins that misbehave, run by the real data plane on real sockets: runaway loops, memory
//! growth past the cap, traps under every fail strategy, and a long run of faults. The proxy
//! must survive each, apply the plugin's fail strategy, and keep serving everything else.

mod support;

use std::time::{Duration, Instant};

use support::*;

const MISBEHAVE: &str = "misbehave";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_loop_is_interrupted_and_the_worker_keeps_serving() {
    let ip = net(0);
    let backend = Backend::start(ip).await;
    let deadline = Duration::from_millis(200);
    let engine = engine(deadline, 64 << 20);
    let misbehave = compile(&engine, &plugin_wasm(MISBEHAVE));
    let noop = compile(&engine, &plugin_wasm("noop"));
    // One worker: the looping request and every other request share its thread.
    let dp = dataplane(ip, 1).await;
    let yaml = |strategy: &str| {
        manifests(
            backend.addr,
            &[
                ("looping", 18080, Some((strategy, "{}"))),
                ("other", 18081, Some(("FAIL_CLOSE", "{}"))),
            ],
        )
    };
    let module_for = |name: &str| {
        if name.starts_with("looping") {
            misbehave.clone()
        } else {
            noop.clone()
        }
    };
    let addrs = apply_all(&dp, runtime(&yaml("FAIL_CLOSE"), module_for)).await;
    let (looping, other) = (addrs["looping"], addrs["other"]);

    let c = client();
    assert_eq!(send(&c, looping, "/", &[]).await.status, 200);
    let started = Instant::now();
    let stuck = {
        let c = c.clone();
        tokio::spawn(async move { send(&c, looping, "/", &[("x-misbehave", "loop")]).await })
    };
    // Requests that arrive while the guest spins, through another plugin on the same worker.
    // (Requests in flight on the faulted instance itself would get its fail strategy: their
    // plugin contexts are gone with it.)
    let mut others = Vec::new();
    for _ in 0..20 {
        let c = c.clone();
        others.push(tokio::spawn(async move { send(&c, other, "/", &[]).await }));
    }
    let answer = stuck.await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.body.contains("default.looping-plugin"), "{answer:?}");
    assert!(
        elapsed >= deadline && elapsed < deadline * 15,
        "the loop was interrupted after {elapsed:?}, deadline {deadline:?}"
    );
    for o in others {
        let a = o.await.unwrap();
        assert_eq!(a.status, 200, "{a:?}");
    }
    // The callback's recorded duration is the time the guest spun (the callback clock is the
    // TSC, scaled to nanoseconds): at least the deadline, and within the bound the request's
    // own time is held to (the sum also holds the first request's few microseconds).
    let mut metrics = String::new();
    waystone_proxy::metrics::render_prometheus(&mut metrics);
    let spun = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "waystone_wasm_plugin_call_duration_seconds_sum{plugin=\"default.looping-plugin\",\
                 callback=\"proxy_on_request_headers\"} ",
            )
        })
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| {
            panic!("no request-headers duration for the looping plugin:\n{metrics}")
        });
    assert!(
        spun >= deadline.as_secs_f64() && spun < (deadline * 15).as_secs_f64(),
        "recorded {spun} s, deadline {deadline:?}, request {elapsed:?}"
    );
    // The interrupted instance was replaced: the next request starts a fresh one.
    let a = send(&c, looping, "/", &[]).await;
    assert_eq!((a.status, a.header("x-misbehave-count")), (200, Some("1")));

    // FAIL_OPEN: the stuck plugin is bypassed and the request reaches the upstream.
    let looping = apply(&dp, runtime(&yaml("FAIL_OPEN"), module_for), "looping").await;
    let hits = backend.hits();
    let a = send(&c, looping, "/", &[("x-misbehave", "loop")]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-served-by"), Some("backend"));
    assert_eq!(a.header("x-misbehave-count"), None, "bypassed: {a:?}");
    assert_eq!(backend.hits(), hits + 1);
    dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_growth_past_the_cap_traps_and_the_instance_is_replaced() {
    let ip = net(1);
    let backend = Backend::start(ip).await;
    let cap = 16 << 20;
    let engine = engine(Duration::from_secs(5), cap);
    let misbehave = compile(&engine, &plugin_wasm(MISBEHAVE));
    let dp = dataplane(ip, 1).await;
    let yaml = manifests(
        backend.addr,
        &[("hungry", 18080, Some(("FAIL_CLOSE", "{grow_mib: 64}")))],
    );
    let addr = apply(&dp, runtime(&yaml, |_| misbehave.clone()), "hungry").await;
    let c = client();
    assert_eq!(send(&c, addr, "/", &[]).await.status, 200);
    let before = rss_bytes();
    let rounds = 40;
    for round in 0..rounds {
        let hits = backend.hits();
        let a = send(&c, addr, "/", &[("x-misbehave", "grow")]).await;
        assert_eq!(a.status, 503, "round {round}: {a:?}");
        assert_eq!(
            backend.hits(),
            hits,
            "a faulted request never reaches the upstream"
        );
        let a = send(&c, addr, "/", &[]).await;
        assert_eq!(
            (a.status, a.header("x-misbehave-count")),
            (200, Some("1")),
            "round {round}: a fresh instance serves the next request"
        );
    }
    let grown = rss_bytes().saturating_sub(before);
    // Each round filled ~16 MiB; kept instances would add rounds × 16 MiB = 640 MiB.
    assert!(
        grown < 96 << 20,
        "RSS grew by {} MiB over {rounds} capped instances",
        grown >> 20
    );
    eprintln!(
        "memory cap: {rounds} traps at {} MiB, RSS grew {} MiB",
        cap >> 20,
        grown >> 20
    );
    dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_strategies_decide_what_a_trap_does() {
    let ip = net(2);
    let backend = Backend::start(ip).await;
    let engine = engine(Duration::from_secs(1), 64 << 20);
    let misbehave = compile(&engine, &plugin_wasm(MISBEHAVE));
    let dp = dataplane(ip, 1).await;
    let yaml = manifests(
        backend.addr,
        &[
            ("close", 18080, Some(("FAIL_CLOSE", "{}"))),
            ("open", 18081, Some(("FAIL_OPEN", "{}"))),
            ("reload", 18082, Some(("FAIL_RELOAD", "{}"))),
        ],
    );
    let addrs = apply_all(&dp, runtime(&yaml, |_| misbehave.clone())).await;
    let (close, open, reload) = (addrs["close"], addrs["open"], addrs["reload"]);
    let c = client();

    // FAIL_CLOSE: an authz plugin that crashes never lets a request through.
    for how in [("x-misbehave", "trap"), ("x-misbehave", "abort")] {
        let hits = backend.hits();
        let a = send(&c, close, "/", &[how]).await;
        assert_eq!(a.status, 503, "{how:?}: {a:?}");
        assert!(
            a.body.contains("plugin default.close-plugin failed"),
            "{a:?}"
        );
        assert_eq!(backend.hits(), hits, "{how:?} reached the upstream");
    }
    // A crash in the response path replaces the upstream's answer with 503 too.
    let a = send(&c, close, "/", &[("x-misbehave-response", "trap")]).await;
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.header("x-served-by"), None);

    // FAIL_OPEN: the plugin is bypassed for that request; the upstream answers.
    let hits = backend.hits();
    let a = send(&c, open, "/", &[("x-misbehave", "trap")]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-misbehave-count"), None, "bypassed: {a:?}");
    assert_eq!(backend.hits(), hits + 1);

    // FAIL_RELOAD: 503 for the faulted request, then a fresh instance (count restarts at 1)
    // that is kept for the requests after it.
    let a = send(&c, reload, "/", &[]).await;
    assert_eq!(a.header("x-misbehave-count"), Some("1"));
    let a = send(&c, reload, "/", &[("x-misbehave", "trap")]).await;
    assert_eq!(a.status, 503, "{a:?}");
    for want in ["1", "2", "3"] {
        let a = send(&c, reload, "/", &[]).await;
        assert_eq!((a.status, a.header("x-misbehave-count")), (200, Some(want)));
    }
    dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_against_a_plugin_that_traps_on_every_third() {
    let ip = net(3);
    let backend = Backend::start(ip).await;
    let engine = engine(Duration::from_secs(1), 64 << 20);
    let misbehave = compile(&engine, &plugin_wasm(MISBEHAVE));
    let dp = dataplane(ip, 1).await;
    let yaml = manifests(
        backend.addr,
        &[("flaky", 18080, Some(("FAIL_CLOSE", "{trap_every: 3}")))],
    );
    let addr = apply(&dp, runtime(&yaml, |_| misbehave.clone()), "flaky").await;
    let c = client();
    let total = 10_000u64;
    let started = Instant::now();
    let (mut ok, mut unavailable, mut other) = (0u64, 0u64, Vec::new());
    for i in 1..=total {
        let a = send(&c, addr, "/", &[]).await;
        match a.status {
            200 => {
                ok += 1;
                // The instance counts requests since it started: 1, 2, then a trap and a
                // fresh one.
                let want = if i % 3 == 1 { "1" } else { "2" };
                assert_eq!(a.header("x-misbehave-count"), Some(want), "request {i}");
            }
            503 => {
                assert_eq!(i % 3, 0, "request {i} failed out of turn: {a:?}");
                unavailable += 1;
            }
            _ => other.push((i, a.status)),
        }
    }
    let elapsed = started.elapsed();
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert_eq!((ok, unavailable), (6667, 3333));
    assert_eq!(
        backend.hits(),
        ok,
        "only the requests that passed reached the upstream"
    );
    eprintln!(
        "{total} requests, {unavailable} traps, in {elapsed:?} ({:.0} req/s)",
        total as f64 / elapsed.as_secs_f64()
    );
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    dp.shutdown(Duration::from_secs(2)).await;
}
