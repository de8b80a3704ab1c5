//! HTTP/2, checked with a plain HTTP/2 client (the `h2` crate) so that the test holds exactly
//! one TCP connection: over TLS (`--tls-cert`), ALPN picks `h2` and that one connection carries
//! many event streams at once, with `/publish` and `/status` beside them; HTTP/1.1 clients are
//! still served on the TLS port. With `--h2c`, the same over plain TCP (prior knowledge), and
//! HTTP/1.1 on the same port. The browser's view of it is in `browser.rs`.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use support::{Certificate, Gateway, WAIT};

/// More streams than the six HTTP/1.1 connections a browser opens per origin.
const STREAMS: usize = 10;

/// A TLS connection that trusts `cert` and offers these ALPN protocols.
async fn tls_connect(
    gateway: &Gateway,
    cert: &Certificate,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(gateway.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// Starts HTTP/2 on `io`; the connection is driven by a task of its own.
async fn h2_handshake<T>(io: T) -> SendRequest<Bytes>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = h2::client::handshake(io).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Sends a request on its own stream of the connection; returns the response's status and
/// body stream after asserting that it came over HTTP/2.
async fn request(
    client: &SendRequest<Bytes>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, h2::RecvStream) {
    let mut client = client.clone().ready().await.expect("stream available");
    let mut builder = http::Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"));
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let (response, mut send) = client
        .send_request(builder.body(()).unwrap(), body.is_none())
        .expect("send request");
    if let Some(body) = body {
        send.send_data(Bytes::from(body.to_string()), true)
            .expect("send body");
    }
    let response = response.await.expect("response");
    assert_eq!(response.version(), http::Version::HTTP_2);
    (response.status().as_u16(), response.into_body())
}

/// Reads from `body` until what has arrived contains `needle`; returns all of it.
async fn read_until(body: &mut h2::RecvStream, needle: &str) -> String {
    let mut seen = String::new();
    let read = async {
        while !seen.contains(needle) {
            let chunk = body
                .data()
                .await
                .expect("the stream ended")
                .expect("stream error");
            // Opens the window again for what was read, so the server may send more.
            let _ = body.flow_control().release_capacity(chunk.len());
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} within {WAIT:?}; got {seen:?}"));
    seen
}

async fn json(status_and_body: (u16, h2::RecvStream)) -> serde_json::Value {
    let (status, mut body) = status_and_body;
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    serde_json::from_slice(&bytes).expect("a JSON body")
}

/// `STREAMS` event streams on one HTTP/2 connection, each receiving an event published on the
/// same connection; `/status` on it too counts them all.
async fn many_streams_on_one_connection(client: SendRequest<Bytes>) {
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let (status, mut body) =
            request(&client, "GET", &format!("/events?topic=h2-{i}"), None).await;
        assert_eq!(status, 200);
        // The preamble: the stream is subscribed from here on.
        read_until(&mut body, "\n\n").await;
        streams.push(body);
    }
    let status = json(request(&client, "GET", "/status", None).await).await;
    assert_eq!(status["connections"], STREAMS, "{status}");
    for (i, body) in streams.iter_mut().enumerate() {
        let published =
            serde_json::json!({ "topic": format!("h2-{i}"), "data": format!("hello {i}") });
        let reply = json(request(&client, "POST", "/publish", Some(published)).await).await;
        let id = reply["id"].as_str().unwrap();
        let received = read_until(body, &format!("data: hello {i}\n\n")).await;
        assert!(
            received.contains(&format!("id: {id}\ndata: hello {i}\n\n")),
            "{received:?}"
        );
    }
}

#[tokio::test]
async fn tls_negotiates_http2_and_multiplexes_event_streams_on_one_connection() {
    let cert = Certificate::self_signed("http2-tls");
    let gateway =
        Gateway::start_unchecked(&["--tls-cert", &cert.cert_path, "--tls-key", &cert.key_path]);
    let tls = tls_connect(&gateway, &cert, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    many_streams_on_one_connection(h2_handshake(tls).await).await;
}

#[tokio::test]
async fn tls_still_serves_http1_clients() {
    let cert = Certificate::self_signed("http1-tls");
    let gateway =
        Gateway::start_unchecked(&["--tls-cert", &cert.cert_path, "--tls-key", &cert.key_path]);
    // One that asks for HTTP/1.1, and one that names no protocol at all.
    for alpn in [&[&b"http/1.1"[..]][..], &[]] {
        let mut tls = tls_connect(&gateway, &cert, alpn).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), alpn.first().copied());
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        tokio::time::timeout(WAIT, tls.read_to_string(&mut reply))
            .await
            .expect("no reply")
            .unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply:?}");
    }
}

#[tokio::test]
async fn h2c_serves_http2_with_prior_knowledge_beside_http1() {
    // Waiting for readiness already went over HTTP/1.1 on this port.
    let gateway = Gateway::start(&["--h2c", "true"]);
    let tcp = TcpStream::connect(gateway.addr).await.unwrap();
    many_streams_on_one_connection(h2_handshake(tcp).await).await;
    assert_eq!(
        support::http_status(gateway.addr, "GET", "/healthz"),
        Some(200)
    );
}

#[tokio::test]
async fn without_h2c_a_plain_listener_speaks_only_http1() {
    let gateway = Gateway::start(&[]);
    let tcp = TcpStream::connect(gateway.addr).await.unwrap();
    // The HTTP/2 preface is no HTTP/1.1 request: the handshake or the first request fails.
    let refused = async {
        let client = h2_handshake(tcp).await;
        let mut client = client.ready().await?;
        let request = http::Request::get("http://localhost/healthz")
            .body(())
            .unwrap();
        let (response, _) = client.send_request(request, true)?;
        response.await.map(|_| ())
    };
    let outcome = tokio::time::timeout(WAIT, refused)
        .await
        .expect("no answer to an HTTP/2 request");
    assert!(outcome.is_err(), "HTTP/2 was served without --h2c");
}
