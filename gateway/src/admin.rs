//! The admin listener: `/metrics`, `/healthz`, `/ready`, `POST /reload`, `GET /config`.
//!
//! It runs on the control-plane thread, apart from the workers, so a saturated data plane
//! still answers health checks and scrapes. Requests are tiny and few: one request per
//! connection, answered and closed.

use crate::control::Control;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub async fn serve(listener: TcpListener, control: Arc<Control>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let control = control.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, control)).await;
        });
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

fn text(status: u16, body: impl Into<String>) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.into(),
    }
}

async fn handle(mut stream: TcpStream, control: Arc<Control>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let (method, path, authorization) = loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let auth = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned());
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path
                        .unwrap_or("")
                        .split('?')
                        .next()
                        .unwrap_or("")
                        .to_string(),
                    auth,
                );
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => {
                return write(&mut stream, text(400, "bad request\n")).await;
            }
        }
    };
    let response = route(&control, &method, &path, authorization.as_deref());
    write(&mut stream, response).await
}

fn route(control: &Control, method: &str, path: &str, authorization: Option<&str>) -> Response {
    let shared = &control.shared;
    let authorized = || {
        let snap = shared.snapshot();
        match &snap.config.admin.token {
            None => true,
            Some(token) => authorization
                .and_then(|a| a.strip_prefix("Bearer "))
                .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes())),
        }
    };
    match (method, path) {
        ("GET" | "HEAD", "/healthz") => {
            // Workers publish every 200 ms from their own runtime; one silent for seconds
            // is wedged (or its thread died), which a liveness probe must see.
            let silent = shared.metrics.silent_workers(5_000);
            if silent.is_empty() {
                text(200, "ok\n")
            } else {
                text(503, format!("workers not answering: {silent:?}\n"))
            }
        }
        ("GET" | "HEAD", "/ready") => {
            if shared.is_draining() {
                text(503, "draining\n")
            } else if !shared.listening.load(std::sync::atomic::Ordering::Acquire) {
                text(503, "starting\n")
            } else {
                text(200, "ready\n")
            }
        }
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: crate::metrics::render(control),
        },
        ("POST", "/reload") => {
            if !authorized() {
                return text(401, "unauthorized\n");
            }
            match control.reload() {
                Ok(summary) => text(200, format!("{summary}\n")),
                Err(errors) => text(400, format!("{errors}\n")),
            }
        }
        ("GET", "/config") => {
            if !authorized() {
                return text(401, "unauthorized\n");
            }
            let snap = shared.snapshot();
            Response {
                status: 200,
                content_type: "application/json",
                body: serde_json::to_string_pretty(&snap.config).unwrap_or_default() + "\n",
            }
        }
        (_, "/healthz" | "/ready" | "/metrics" | "/reload" | "/config") => {
            text(405, "method not allowed\n")
        }
        _ => text(404, "not found\n"),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn write(stream: &mut TcpStream, r: Response) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        crate::http::reason(r.status),
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(r.body.as_bytes()).await?;
    stream.shutdown().await
}
