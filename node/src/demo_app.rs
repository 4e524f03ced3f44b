//! The demo's sample app (`shoal demo-app`, run by the native runtime on
//! every demo node): a "meter" that shows the message its Config renders
//! into `message.txt` and counts seconds since it started. Every second it
//! writes `status.json` (message, count, port) into its directory, and it
//! serves a small page with both on a free local port, so a newcomer sees
//! a desired-state edit arrive on each node.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs until killed.
pub fn run() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let state = Arc::new(Mutex::new((String::new(), 0u64)));
    let shared = state.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let (msg, count) = shared.lock().map(|g| g.clone()).unwrap_or_default();
            let body = format!(
                "<!doctype html><meta http-equiv=refresh content=1><title>meter</title>\
                 <body style=\"font:2em sans-serif;margin:2em\"><p>{}</p><p style=\"color:#666\">running {count} s</p>",
                html_escape(&msg)
            );
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let started = Instant::now();
    loop {
        let msg = std::fs::read_to_string("message.txt")
            .map(|m| m.trim().to_string())
            .unwrap_or_else(|_| "(no message.txt)".into());
        let count = started.elapsed().as_secs();
        if let Ok(mut g) = state.lock() {
            *g = (msg.clone(), count);
        }
        let status = serde_json::json!({ "message": msg, "count": count, "port": port });
        let _ = std::fs::write("status.json.tmp", status.to_string())
            .and_then(|_| std::fs::rename("status.json.tmp", "status.json"));
        println!("meter: {msg} ({count} s)");
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
