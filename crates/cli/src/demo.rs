//! Istio's bookinfo, shrunk to four tiny HTTP services on loopback so the walkthrough has
//! something to route to: productpage, reviews, details and ratings. Each answers HTTP/1.1 and
//! h2c, and names itself in `x-served-by` so tests can tell who answered.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The services, in the order manifests list them.
pub const SERVICES: [&str; 4] = ["productpage", "reviews", "details", "ratings"];
/// The port every bookinfo Service declares, as in Istio's samples.
pub const SERVICE_PORT: u16 = 9080;
pub const SERVED_BY: &str = "x-served-by";

/// The running services; dropping it stops them.
#[derive(Debug)]
pub struct Bookinfo {
    address: IpAddr,
    services: Vec<(&'static str, SocketAddr)>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Bookinfo {
    /// The address every service listens on.
    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// `(service, listening address)` for each service.
    pub fn services(&self) -> &[(&'static str, SocketAddr)] {
        &self.services
    }

    pub fn addr(&self, service: &str) -> Option<SocketAddr> {
        self.services
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, a)| *a)
    }

    /// Stops accepting, closes open connections and waits until every task has ended.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for Bookinfo {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Binds the four services on `addr`, each on a free port, and serves them in the background.
pub async fn start_bookinfo(addr: IpAddr) -> io::Result<Bookinfo> {
    let (stop, stopped) = watch::channel(false);
    let mut services = Vec::new();
    let mut tasks = Vec::new();
    for service in SERVICES {
        let listener = TcpListener::bind(SocketAddr::new(addr, 0)).await?;
        services.push((service, listener.local_addr()?));
        tasks.push(tokio::spawn(serve(service, listener, stopped.clone())));
    }
    Ok(Bookinfo {
        address: addr,
        services,
        stop,
        tasks,
    })
}

async fn serve(service: &'static str, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let builder = Builder::new(TokioExecutor::new());
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors and the like: keep serving what we can.
                        tracing::warn!(service, error = %e, "accept failed");
                        continue;
                    }
                };
                let builder = builder.clone();
                connections.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| async move {
                        Ok::<_, Infallible>(respond(service, req.method(), req.uri().path()))
                    });
                    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                        tracing::debug!(service, error = %e, "connection ended with an error");
                    }
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

type Reply = Response<Full<Bytes>>;

fn reply(
    service: &'static str,
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Reply {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(SERVED_BY, HeaderValue::from_static(service));
    resp
}

fn json_reply(service: &'static str, status: StatusCode, body: serde_json::Value) -> Reply {
    reply(service, status, "application/json", body.to_string())
}

fn not_found(service: &'static str) -> Reply {
    reply(
        service,
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "404 page not found\n",
    )
}

fn redirect(service: &'static str, cookie: &'static str) -> Reply {
    let mut resp = reply(service, StatusCode::FOUND, "text/plain; charset=utf-8", "");
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/productpage"));
    resp.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_static(cookie));
    resp
}

/// Answers one request of `service`.
pub fn respond(service: &'static str, method: &Method, path: &str) -> Reply {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let readable = method == Method::GET || method == Method::HEAD;
    let login = service == "productpage" && matches!(segments.as_slice(), ["login"]);
    let allowed = readable || (login && method == Method::POST);
    if !allowed {
        let mut resp = reply(
            service,
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n",
        );
        let allow = if login {
            "GET, HEAD, POST"
        } else {
            "GET, HEAD"
        };
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        return resp;
    }
    if segments.as_slice() == ["health"] {
        return json_reply(
            service,
            StatusCode::OK,
            json!({"status": format!("{service} is healthy")}),
        );
    }
    match (service, segments.as_slice()) {
        ("productpage", [""] | ["index.html"]) => reply(
            service,
            StatusCode::OK,
            "text/html; charset=utf-8",
            index_page(),
        ),
        ("productpage", ["productpage"]) => reply(
            service,
            StatusCode::OK,
            "text/html; charset=utf-8",
            product_page(),
        ),
        ("productpage", ["static", rest @ ..]) if !rest.is_empty() && !rest.contains(&"") => {
            let file = rest.join("/");
            let content_type = match file.rsplit('.').next() {
                Some("css") => "text/css; charset=utf-8",
                Some("js") => "application/javascript",
                _ => "application/octet-stream",
            };
            reply(
                service,
                StatusCode::OK,
                content_type,
                format!("/* bookinfo static file {file} */\n"),
            )
        }
        ("productpage", ["login"]) => redirect(service, "session=bookinfo-user; Path=/"),
        ("productpage", ["logout"]) => redirect(service, "session=; Path=/; Max-Age=0"),
        ("productpage", ["api", "v1", "products"]) => {
            json_reply(service, StatusCode::OK, json!([product(0)]))
        }
        ("productpage", ["api", "v1", "products", id, tail @ ..]) => {
            with_id(service, id, |id| match tail {
                [] => Some(
                    json!({"id": id, "author": "William Shakespeare", "year": 1595, "type": "paperback",
                              "pages": 200, "publisher": "PublisherA", "language": "English",
                              "ISBN-10": "1234567890", "ISBN-13": "123-1234567890"}),
                ),
                ["reviews"] => Some(reviews(id)),
                ["ratings"] => Some(ratings(id)),
                _ => None,
            })
        }
        ("reviews", ["reviews", id]) => with_id(service, id, |id| Some(reviews(id))),
        ("details", ["details", id]) => with_id(service, id, |id| {
            Some(
                json!({"id": id, "author": "William Shakespeare", "year": 1595, "type": "paperback",
                        "pages": 200, "publisher": "PublisherA", "language": "English",
                        "ISBN-10": "1234567890", "ISBN-13": "123-1234567890"}),
            )
        }),
        ("ratings", ["ratings", id]) => with_id(service, id, |id| Some(ratings(id))),
        _ => not_found(service),
    }
}

fn with_id(
    service: &'static str,
    id: &str,
    body: impl FnOnce(u32) -> Option<serde_json::Value>,
) -> Reply {
    match id.parse::<u32>() {
        Ok(id) => match body(id) {
            Some(v) => json_reply(service, StatusCode::OK, v),
            None => not_found(service),
        },
        Err(_) => json_reply(
            service,
            StatusCode::BAD_REQUEST,
            json!({"error": "please provide numeric product id"}),
        ),
    }
}

fn product(id: u32) -> serde_json::Value {
    json!({"id": id, "title": "The Comedy of Errors",
           "descriptionHtml": "<a href=\"https://en.wikipedia.org/wiki/The_Comedy_of_Errors\">Wikipedia Summary</a>: \
                               The Comedy of Errors is one of William Shakespeare's early plays."})
}

fn reviews(id: u32) -> serde_json::Value {
    json!({"id": id.to_string(), "podname": "reviews-local", "clustername": "null", "reviews": [
        {"reviewer": "Reviewer1", "text": "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"},
        {"reviewer": "Reviewer2", "text": "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare."},
    ]})
}

fn ratings(id: u32) -> serde_json::Value {
    json!({"id": id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}})
}

fn index_page() -> String {
    "<!DOCTYPE html>\n<html><head><title>Simple Bookstore App</title></head>\n<body>\n\
     <h3>Hello! This is a simple bookstore application consisting of four services.</h3>\n\
     <p><a href=\"/productpage?u=normal\">Normal user</a></p>\n\
     <p><a href=\"/productpage?u=test\">Test user</a></p>\n</body></html>\n"
        .to_string()
}

fn product_page() -> String {
    "<!DOCTYPE html>\n<html><head><title>Simple Bookstore App</title>\n\
     <link rel=\"stylesheet\" href=\"static/bootstrap/css/bootstrap.min.css\"></head>\n<body>\n\
     <nav><a href=\"#\">BookInfo Sample</a> <form method=\"post\" action=\"login\"><button>Sign in</button></form></nav>\n\
     <h1>The Comedy of Errors</h1>\n\
     <p>Summary: The Comedy of Errors is one of William Shakespeare's early plays.</p>\n\
     <h4>Book Details</h4><dl><dt>Type:</dt><dd>paperback</dd><dt>Pages:</dt><dd>200</dd></dl>\n\
     <h4>Book Reviews</h4>\n\
     <blockquote><p>An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!</p><small>Reviewer1</small></blockquote>\n\
     <blockquote><p>Absolutely fun and entertaining.</p><small>Reviewer2</small></blockquote>\n\
     </body></html>\n"
        .to_string()
}

/// The Service and EndpointSlice manifests that point the mesh at the running services.
pub fn bookinfo_manifests(namespace: &str, bookinfo: &Bookinfo) -> String {
    let address_type = if bookinfo.address.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    };
    let mut out = String::new();
    for (i, (service, addr)) in bookinfo.services.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        let _ = write!(
            out,
            "apiVersion: v1\n\
             kind: Service\n\
             metadata:\n  name: {service}\n  namespace: {namespace}\n  labels:\n    app: {service}\n    service: {service}\n\
             spec:\n  ports:\n  - name: http\n    port: {SERVICE_PORT}\n    protocol: TCP\n  selector:\n    app: {service}\n\
             ---\n\
             apiVersion: discovery.k8s.io/v1\n\
             kind: EndpointSlice\n\
             metadata:\n  name: {service}-local\n  namespace: {namespace}\n  labels:\n    kubernetes.io/service-name: {service}\n\
             addressType: {address_type}\n\
             endpoints:\n- addresses:\n  - \"{ip}\"\n  conditions:\n    ready: true\n\
             ports:\n- name: http\n  port: {port}\n  protocol: TCP\n",
            ip = addr.ip(),
            port = addr.port(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use std::net::Ipv4Addr;

    async fn get(
        client: &Client<HttpConnector, Full<Bytes>>,
        addr: SocketAddr,
        path: &str,
    ) -> (StatusCode, String, String) {
        let req = Request::get(format!("http://{addr}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let status = resp.status();
        let served_by = resp
            .headers()
            .get(SERVED_BY)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, served_by, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn services_answer_on_real_sockets() {
        let b = start_bookinfo(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .await
            .unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        let pp = b.addr("productpage").unwrap();

        let (status, by, body) = get(&client, pp, "/productpage").await;
        assert_eq!((status, by.as_str()), (StatusCode::OK, "productpage"));
        assert!(body.contains("Simple Bookstore App"), "{body}");
        assert_eq!(
            get(&client, pp, "/static/bootstrap/css/bootstrap.min.css")
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(get(&client, pp, "/login").await.0, StatusCode::FOUND);
        assert_eq!(get(&client, pp, "/logout").await.0, StatusCode::FOUND);
        let (status, _, body) = get(&client, pp, "/api/v1/products").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()[0]["title"],
            "The Comedy of Errors"
        );
        assert_eq!(
            get(&client, pp, "/reviews/1").await.0,
            StatusCode::NOT_FOUND
        );

        let (status, by, body) = get(&client, b.addr("reviews").unwrap(), "/reviews/1").await;
        assert_eq!((status, by.as_str()), (StatusCode::OK, "reviews"));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"],
            "1"
        );
        let (status, by, _) = get(&client, b.addr("details").unwrap(), "/details/7").await;
        assert_eq!((status, by.as_str()), (StatusCode::OK, "details"));
        let (status, by, body) = get(&client, b.addr("ratings").unwrap(), "/ratings/2").await;
        assert_eq!((status, by.as_str()), (StatusCode::OK, "ratings"));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["ratings"]["Reviewer1"],
            5
        );
        let (status, by, _) = get(&client, b.addr("details").unwrap(), "/nope").await;
        assert_eq!((status, by.as_str()), (StatusCode::NOT_FOUND, "details"));
        assert_eq!(
            get(&client, b.addr("ratings").unwrap(), "/ratings/x")
                .await
                .0,
            StatusCode::BAD_REQUEST
        );

        // h2c (prior knowledge) on the same port.
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let (status, by, _) = get(&h2, b.addr("reviews").unwrap(), "/reviews/2").await;
        assert_eq!((status, by.as_str()), (StatusCode::OK, "reviews"));

        b.shutdown().await;
        assert!(
            tokio::net::TcpStream::connect(pp).await.is_err(),
            "productpage still accepts after shutdown"
        );
    }

    #[test]
    fn methods() {
        assert_eq!(
            respond("productpage", &Method::POST, "/login").status(),
            StatusCode::FOUND
        );
        let resp = respond("reviews", &Method::DELETE, "/reviews/1");
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[SERVED_BY], "reviews");
        assert_eq!(
            respond("productpage", &Method::HEAD, "/productpage").status(),
            StatusCode::OK
        );
        assert_eq!(
            respond("productpage", &Method::GET, "/static/").status(),
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn manifests_parse_and_point_at_the_ports() {
        let b = start_bookinfo(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .await
            .unwrap();
        let text = bookinfo_manifests("bookinfo", &b);
        let objects = waystone_model::parse_manifests(&text, "bookinfo.yaml").unwrap();
        let names: Vec<String> = objects
            .iter()
            .map(|o| format!("{}:{}", o.kind_info().kind, o.display_name()))
            .collect();
        assert_eq!(
            names,
            [
                "Service:bookinfo/productpage",
                "EndpointSlice:bookinfo/productpage-local",
                "Service:bookinfo/reviews",
                "EndpointSlice:bookinfo/reviews-local",
                "Service:bookinfo/details",
                "EndpointSlice:bookinfo/details-local",
                "Service:bookinfo/ratings",
                "EndpointSlice:bookinfo/ratings-local",
            ]
        );
        let json: Vec<serde_json::Value> = objects.iter().map(|o| o.to_json()).collect();
        assert_eq!(
            json[0]["spec"]["ports"][0],
            json!({"name": "http", "port": 9080, "protocol": "TCP"})
        );
        assert_eq!(
            json[0]["metadata"]["labels"],
            json!({"app": "productpage", "service": "productpage"})
        );
        assert_eq!(json[0]["spec"]["selector"], json!({"app": "productpage"}));
        let slice = &json[3];
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "reviews"
        );
        assert_eq!(slice["addressType"], "IPv4");
        assert_eq!(slice["endpoints"][0]["addresses"], json!(["127.0.0.1"]));
        assert_eq!(slice["endpoints"][0]["conditions"]["ready"], true);
        assert_eq!(slice["ports"][0]["port"], b.addr("reviews").unwrap().port());
        b.shutdown().await;
    }
}
