//! The plain-HTTP upstream client (`mesh_runtime::h1`) against a scripted
//! server on a real socket: every way RFC 9112 frames an answer, connection
//! reuse, and a pooled connection the server closed while it was idle.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_runtime::h1::Pool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server does after answering a request.
#[derive(Clone, Copy)]
enum After {
    Keep,
    Close,
}

/// A server answering the n-th request on every connection with
/// `answers[n]` (the raw bytes), then keeping or closing the connection.
/// Returns its address and the number of connections it accepted.
async fn server(answers: Vec<(&'static [u8], After)>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let answers = Arc::new(answers);
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let (answers, next) = (answers.clone(), next.clone());
            tokio::spawn(async move { serve(stream, &answers, &next).await });
        }
    });
    (addr, accepted)
}

async fn serve(mut stream: TcpStream, answers: &[(&'static [u8], After)], next: &AtomicUsize) {
    let mut buf = Vec::new();
    loop {
        // One request: the head, then Content-Length bytes.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        let (answer, after) = answers[next.fetch_add(1, Ordering::SeqCst) % answers.len()];
        if stream.write_all(answer).await.is_err() {
            return;
        }
        if let After::Close = after {
            return;
        }
    }
}

const REQUEST: &[u8] = b"POST /x HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}";

#[tokio::test]
async fn content_length_answers_reuse_one_connection() {
    let (addr, accepted) = server(vec![(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        After::Keep,
    )])
    .await;
    let pool = Pool::new(&addr);
    for _ in 0..5 {
        let a = pool.send(REQUEST, 1 << 20).await.unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"hello"[..]));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );
}

#[tokio::test]
async fn chunked_answers_with_extensions_and_trailers_are_decoded() {
    let (addr, accepted) = server(vec![(
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n",
        After::Keep,
    )])
    .await;
    let pool = Pool::new(&addr);
    for _ in 0..3 {
        let a = pool.send(REQUEST, 1 << 20).await.unwrap();
        assert_eq!(a.status, 404);
        assert_eq!(a.body, b"abc0123456789abcdef");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_answer_without_length_ends_with_the_connection_which_is_not_reused() {
    let (addr, accepted) = server(vec![(
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
        After::Close,
    )])
    .await;
    let pool = Pool::new(&addr);
    for _ in 0..2 {
        let a = pool.send(REQUEST, 1 << 20).await.unwrap();
        assert_eq!(a.body, b"until the end");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_replaced() {
    // The server answers (keep-alive by the headers) and then closes, as a
    // server whose idle timeout passed does.
    let (addr, accepted) = server(vec![(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        After::Close,
    )])
    .await;
    let pool = Pool::new(&addr);
    for _ in 0..3 {
        let a = pool.send(REQUEST, 1 << 20).await.unwrap();
        assert_eq!(a.body, b"ok");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn interim_answers_are_skipped_and_connection_close_is_honoured() {
    let (addr, accepted) = server(vec![(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 1\r\n\r\n!",
        After::Close,
    )])
    .await;
    let pool = Pool::new(&addr);
    for _ in 0..2 {
        let a = pool.send(REQUEST, 1 << 20).await.unwrap();
        assert_eq!((a.status, a.body.as_slice()), (201, &b"!"[..]));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn bad_answers_are_errors_not_panics() {
    for (answer, expected) in [
        (
            &b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"[..],
            "mid-answer",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n", "over"),
        (b"garbage\r\n\r\n", "invalid HTTP"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "chunk size",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "two different",
        ),
        (b"", "without an answer"),
    ] {
        let (addr, _) = server(vec![(answer, After::Close)]).await;
        let e = Pool::new(&addr)
            .send(REQUEST, 1024)
            .await
            .expect_err("a bad answer");
        assert!(e.contains(expected), "{answer:?}: {e}");
    }
    let e = Pool::new("127.0.0.1:1")
        .send(REQUEST, 1024)
        .await
        .expect_err("nobody listens on port 1");
    assert!(e.contains("cannot connect"), "{e}");
}
