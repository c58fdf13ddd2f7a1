//! Pull policies end to end: `waystone up` (in this process) against a real registry whose
//! tags move under it. Whether a plugin load went to the registry is read from the registry's
//! own access log and from Istio's fetch metrics (process-global, hence one test here).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use waystone_control::{UpOptions, run_up};
use waystone_fetch::testing::Registry;
use waystone_fetch::{ConversionResult, PushOptions, RemoteFetchResult, metrics, push};

/// A minimal Proxy-Wasm module; `marker` makes each one distinct.
fn module(marker: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 0)
            (func (export "proxy_on_context_create") (param i32 i32))
            (func (export "{marker}")))"#
    ))
    .unwrap()
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", waystone_fetch::sha256_hex(bytes))
}

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    async fn wait(data_dir: &Path) -> Api {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr_file = data_dir.join(waystone_control::api::ADDR_FILE);
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                break a;
            }
            assert!(Instant::now() < deadline, "waystone up did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let token =
            std::fs::read_to_string(data_dir.join(waystone_control::api::TOKEN_FILE)).unwrap();
        Api {
            base: format!("http://{addr}"),
            token,
            http: reqwest::Client::new(),
        }
    }

    async fn apply(&self, yaml: &str) {
        let resp = self
            .http
            .post(format!("{}/v1/apply", self.base))
            .bearer_auth(&self.token)
            .json(&json!({"manifests": yaml, "source": "test", "defaultNamespace": "default"}))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{status}: {body}");
    }

    /// The plugin's `status.module.digest` once its ModuleLoaded condition is True.
    async fn loaded_digest(&self, name: &str) -> String {
        let resp = self
            .http
            .get(format!(
                "{}/v1/objects/WasmPlugin?namespace=default&name={name}",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let body: Value = resp.json().await.unwrap();
        let status = &body["items"][0]["status"];
        let loaded = status["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "ModuleLoaded"))
            .unwrap_or_else(|| panic!("no ModuleLoaded in {body}"));
        assert_eq!(loaded["status"], "True", "{name}: {loaded}");
        status["module"]["digest"].as_str().unwrap().to_string()
    }
}

fn plugin(name: &str, url: &str, policy: Option<&str>, version: u32) -> String {
    let policy = policy
        .map(|p| format!("  imagePullPolicy: {p}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: {name}\n\
         spec:\n  targetRefs:\n  - kind: Gateway\n    group: gateway.networking.k8s.io\n    name: gw\n\
         \x20 url: {url}\n{policy}  pluginConfig:\n    version: {version}\n"
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_policies_end_to_end() {
    let reg = Registry::start().unwrap();
    let (a, b) = (module("module_a"), module("module_b"));
    let insecure = PushOptions {
        insecure: true,
        ..PushOptions::default()
    };
    let pushed_a = push(&a, &reg.url("p/m:1.0"), &insecure).await.unwrap();
    push(&a, &reg.url("p/m:latest"), &insecure).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let data_dir: PathBuf = dir.path().join("data");
    let mut opts = UpOptions::new(data_dir.clone());
    opts.insecure_registries = vec![reg.host()];
    opts.entry_address = "127.0.0.1:0".parse().unwrap();
    opts.workers = 1;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let up = tokio::spawn(run_up(opts, async move {
        let _ = stop_rx.await;
    }));
    let api = Api::wait(&data_dir).await;
    api.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: gw\n\
         spec:\n  gatewayClassName: istio\n  listeners:\n  - name: http\n    port: {}\n    protocol: HTTP\n",
        free_port()
    ))
    .await;
    let tag = |t: &str| reg.requests("GET", &format!("/p/m/manifests/{t}"));
    let start = metrics();
    let remote_ok = |from: &waystone_fetch::MetricsSnapshot| {
        metrics().remote(RemoteFetchResult::Success) - from.remote(RemoteFetchResult::Success)
    };

    // IfNotPresent (the default for a tag other than latest): pulled once...
    let url_10 = reg.url("p/m:1.0");
    api.apply(&plugin("ifnp", &url_10, None, 1)).await;
    assert_eq!(api.loaded_digest("ifnp").await, digest(&a));
    assert_eq!(tag("1.0"), 1);
    assert_eq!(remote_ok(&start), 1);
    // ...and not again when the resource changes, even though the tag moved meanwhile.
    push(&b, &url_10, &insecure).await.unwrap();
    let before = metrics();
    api.apply(&plugin("ifnp", &url_10, None, 2)).await;
    assert_eq!(api.loaded_digest("ifnp").await, digest(&a));
    assert_eq!(tag("1.0"), 1);
    assert_eq!(metrics().cache_lookup_hit - before.cache_lookup_hit, 1);
    assert_eq!(remote_ok(&before), 0);

    // Always: re-resolves the tag when the resource changes, and gets what it names now.
    api.apply(&plugin("always", &url_10, Some("Always"), 1))
        .await;
    assert_eq!(api.loaded_digest("always").await, digest(&b));
    assert_eq!(tag("1.0"), 2);
    push(&a, &url_10, &insecure).await.unwrap();
    api.apply(&plugin("always", &url_10, Some("Always"), 2))
        .await;
    assert_eq!(api.loaded_digest("always").await, digest(&a));
    assert_eq!(tag("1.0"), 3);
    // An unrelated change runs a reconcile pass but re-pulls nothing.
    let before = metrics();
    api.apply("apiVersion: v1\nkind: Service\nmetadata:\n  name: unrelated\nspec:\n  ports:\n  - port: 80\n")
        .await;
    assert_eq!(tag("1.0"), 3);
    assert_eq!(metrics().cache_lookup_hit, before.cache_lookup_hit);
    assert_eq!(metrics().cache_lookup_miss, before.cache_lookup_miss);

    // `:latest` without a policy behaves as Always.
    let url_latest = reg.url("p/m:latest");
    api.apply(&plugin("latest", &url_latest, None, 1)).await;
    assert_eq!(api.loaded_digest("latest").await, digest(&a));
    push(&b, &url_latest, &insecure).await.unwrap();
    api.apply(&plugin("latest", &url_latest, None, 2)).await;
    assert_eq!(api.loaded_digest("latest").await, digest(&b));
    assert_eq!(tag("latest"), 2);

    // Pinned by digest: pulled at most once, never again, even under an explicit Always.
    let pinned = pushed_a.reference.clone();
    let by_digest = format!("manifests/{}", pushed_a.manifest_digest);
    let pinned_before = reg.requests("GET", &by_digest);
    for version in 1..=3 {
        api.apply(&plugin("pinned", &pinned, Some("Always"), version))
            .await;
        assert_eq!(api.loaded_digest("pinned").await, digest(&a));
    }
    // Module a's manifest was cached by the first fetches, so not even one request.
    assert_eq!(reg.requests("GET", &by_digest), pinned_before);

    // Every load above was one successful conversion: ifnp 2, always 2, latest 2, pinned 3.
    let end = metrics();
    assert_eq!(
        end.conversion(ConversionResult::Success) - start.conversion(ConversionResult::Success),
        9
    );
    assert_eq!(
        end.conversion(ConversionResult::FetchFailure)
            - start.conversion(ConversionResult::FetchFailure),
        0
    );

    // The compiled modules went to the data directory's cache too (a and b).
    let compiled =
        waystone_wasm::CompiledCache::open(&waystone_control::paths::compiled_cache_dir(&data_dir))
            .unwrap()
            .entries()
            .unwrap();
    let mut digests: Vec<_> = compiled.iter().map(|e| e.module_digest.clone()).collect();
    digests.sort();
    let mut expected = vec![digest(&a), digest(&b)];
    expected.sort();
    assert_eq!(digests, expected);

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), up)
        .await
        .expect("waystone up stops")
        .unwrap()
        .unwrap();
}
