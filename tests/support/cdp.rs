//! A small Chrome DevTools Protocol driver for integration tests against a
//! real, headless Chromium.
//!
//! # The pipe trick
//!
//! CDP is normally spoken over a websocket. Instead we start Chromium with
//! `--remote-debugging-pipe`: it then reads JSON commands from file
//! descriptor 3 and writes replies and events to file descriptor 4, each
//! message ended by a NUL byte. That needs no websocket crate and no port.
//!
//! Mapping our pipes onto fds 3 and 4 of the child would normally take a
//! `pre_exec` hook, which is `unsafe` (forbidden in this workspace). So we let
//! the shell do it: we spawn
//!
//! ```text
//! sh -c 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null' chromium <flags>
//! ```
//!
//! with stdin and stdout piped. The shell duplicates the stdin pipe (our
//! write end) to fd 3 and the stdout pipe (our read end) to fd 4, points fds
//! 0 and 1 at `/dev/null`, and `exec`s Chromium, which keeps the shell's pid.
//! The child gets its own process group so that `Drop` can kill Chromium's
//! helpers too; nothing is left running after a [`Browser`] is dropped.
//!
//! A reader thread splits the pipe into messages and forwards them over a
//! channel; replies are matched to commands by `id`, events are buffered, and
//! page exceptions and `console.error` calls are collected for [`Browser::errors`].
//! Page-level commands go to one page target through a flattened session.
//! Every wait has a deadline.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long one command may take before we give up on its reply.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a navigation may take to fire its load event.
const LOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `Drop` waits for Chromium to exit after `Browser.close`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Polling interval for [`Browser::wait_until`] and for process exit.
const POLL: Duration = Duration::from_millis(50);
/// Buffered events kept for [`Browser::wait_event`]; the oldest go first.
const MAX_EVENTS: usize = 1000;

/// A headless Chromium with one page, driven over CDP. Dropping it closes
/// the browser, kills what is left of it and removes its profile.
pub struct Browser {
    child: Child,
    /// Our end of Chromium's fd 3. `None` once closed.
    to_browser: Option<ChildStdin>,
    /// Messages from Chromium's fd 4 (`Err` if one was not JSON).
    from_browser: Receiver<Result<Value, String>>,
    reader: Option<JoinHandle<()>>,
    /// Flattened session of our page target.
    session: String,
    next_id: u64,
    events: VecDeque<Value>,
    errors: Vec<String>,
    /// Holds `profile/` (the user data dir) and `chromium.log` (stderr).
    dir: Option<tempfile::TempDir>,
    binary: PathBuf,
}

impl Browser {
    /// Starts a headless Chromium whose page is `width`×`height` CSS pixels,
    /// with one blank page attached and `Page` and `Runtime` enabled.
    ///
    /// The binary is `$SHOAL_CHROMIUM`, else `chromium` or
    /// `chromium-browser` on `PATH`; without one this is an error saying so.
    pub fn launch(width: u32, height: u32) -> Result<Browser, String> {
        Browser::launch_with(width, height, &[])
    }

    /// [`Browser::launch`] with more command-line flags.
    pub fn launch_with(width: u32, height: u32, extra: &[String]) -> Result<Browser, String> {
        let binary = find_chromium()?;
        let dir = tempfile::Builder::new()
            .prefix("shoal-cdp-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir for the Chromium profile: {e}"))?;
        let profile = dir.path().join("profile");
        let log_path = dir.path().join("chromium.log");
        let log = File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let mut flags = vec![
            "--headless=new".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--no-first-run".to_string(),
            "--no-default-browser-check".to_string(),
            "--remote-debugging-pipe".to_string(),
            format!("--user-data-dir={}", profile.display()),
            format!("--window-size={width},{height}"),
        ];
        flags.extend_from_slice(extra);
        flags.push("about:blank".to_string());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" 3<&0 4>&1 </dev/null >/dev/null")
            .arg(&binary)
            .args(&flags)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {} through sh: {e}", binary.display()))?;
        let (Some(to_browser), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("spawned Chromium without its pipes".to_string());
        };
        let (tx, from_browser) = channel();
        let reader = std::thread::Builder::new()
            .name("cdp-reader".to_string())
            .spawn(move || {
                let mut pipe = BufReader::new(stdout);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match pipe.read_until(0, &mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if buf.last() == Some(&0) {
                        buf.pop();
                    }
                    let msg = serde_json::from_slice::<Value>(&buf).map_err(|e| {
                        format!(
                            "Chromium sent a message that is not JSON ({e}): {}",
                            String::from_utf8_lossy(&buf)
                        )
                    });
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| format!("cannot start the CDP reader thread: {e}"))?;
        // From here on, an error return drops `browser`, which cleans up.
        let mut browser = Browser {
            child,
            to_browser: Some(to_browser),
            from_browser,
            reader: Some(reader),
            session: String::new(),
            next_id: 0,
            events: VecDeque::new(),
            errors: Vec::new(),
            dir: Some(dir),
            binary,
        };
        let target = browser.browser_call("Target.createTarget", json!({"url": "about:blank"}))?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or_else(|| format!("Target.createTarget returned no targetId: {target}"))?
            .to_string();
        let attached = browser.browser_call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        )?;
        browser.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| format!("Target.attachToTarget returned no sessionId: {attached}"))?
            .to_string();
        browser.call("Page.enable", json!({}))?;
        browser.call("Runtime.enable", json!({}))?;
        // `--window-size` sizes the first window only; pin the page's
        // viewport so screenshots and layouts do not depend on it.
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )?;
        Ok(browser)
    }

    /// Navigates the page to `url` and waits (up to 20 s) for its load
    /// event. A same-document navigation (only the fragment changes)
    /// returns at once.
    pub fn navigate(&mut self, url: &str) -> Result<(), String> {
        // A load event still buffered belongs to an earlier navigation.
        let session = self.session.clone();
        self.events.retain(|e| {
            !(e["method"] == "Page.loadEventFired" && e["sessionId"] == session.as_str())
        });
        let reply = self.call("Page.navigate", json!({"url": url}))?;
        if let Some(err) = reply["errorText"].as_str().filter(|e| !e.is_empty()) {
            return Err(format!("navigating to {url} failed: {err}"));
        }
        if reply.get("loaderId").is_none() {
            return Ok(());
        }
        self.wait_event("Page.loadEventFired", Instant::now() + LOAD_TIMEOUT)
            .map(|_| ())
            .map_err(|e| format!("navigating to {url}: {e}"))
    }

    /// Evaluates the JavaScript expression `js` in the page, awaiting it if
    /// it is a promise, and returns its value as JSON (`undefined` becomes
    /// `null`; `NaN`, `Infinity`, `-0` and bigints become their text). An
    /// exception in the page is an `Err` with its description.
    pub fn eval(&mut self, js: &str) -> Result<Value, String> {
        self.evaluate(js, Instant::now() + COMMAND_TIMEOUT)
    }

    /// Polls the JavaScript expression `js_condition` every 50 ms until it
    /// is truthy (promises are awaited). Exceptions count as "not yet". On
    /// timeout the error names the condition and its last value or error.
    pub fn wait_until(&mut self, js_condition: &str, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let js = format!("(async () => !!(await (\n{js_condition}\n)))()");
        loop {
            let last = match self.evaluate(&js, deadline) {
                Ok(Value::Bool(true)) => return Ok(()),
                Ok(v) => format!("last value {v}"),
                Err(e) => format!("last error: {e}"),
            };
            if Instant::now() + POLL > deadline {
                return Err(format!(
                    "condition `{js_condition}` not true within {within:?} ({last})"
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Clicks the first element matching `css_selector` (with
    /// `HTMLElement.click()`); an error if none matches.
    pub fn click(&mut self, css_selector: &str) -> Result<(), String> {
        let sel = js_string(css_selector);
        let found = self.eval(&format!(
            "(() => {{ const el = document.querySelector({sel}); \
             if (!el) return false; el.click(); return true; }})()"
        ))?;
        if found == Value::Bool(true) {
            Ok(())
        } else {
            Err(format!("click: no element matches `{css_selector}`"))
        }
    }

    /// Sets the value of the input, textarea or select matching
    /// `css_selector` to `text` and dispatches `input` and `change` events
    /// (bubbling), as typing would; an error if none matches.
    pub fn fill(&mut self, css_selector: &str, text: &str) -> Result<(), String> {
        let sel = js_string(css_selector);
        let text_js = js_string(text);
        // The prototype's setter, so frameworks that shadow `value` notice.
        let found = self.eval(&format!(
            "(() => {{ const el = document.querySelector({sel}); \
             if (!el) return false; \
             const d = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(el), 'value'); \
             if (d && d.set) {{ d.set.call(el, {text_js}); }} else {{ el.value = {text_js}; }} \
             el.dispatchEvent(new Event('input', {{ bubbles: true }})); \
             el.dispatchEvent(new Event('change', {{ bubbles: true }})); \
             return true; }})()"
        ))?;
        if found == Value::Bool(true) {
            Ok(())
        } else {
            Err(format!("fill: no element matches `{css_selector}`"))
        }
    }

    /// Writes a PNG screenshot of the viewport to `path`.
    pub fn screenshot(&mut self, path: &Path) -> Result<(), String> {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}))?;
        let data = shot["data"]
            .as_str()
            .ok_or("Page.captureScreenshot returned no data")?;
        let png = base64_decode(data).map_err(|e| format!("screenshot: {e}"))?;
        std::fs::write(path, png).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Uncaught page exceptions and `console.error` messages seen so far
    /// (that is, received before the last command's reply), oldest first.
    pub fn errors(&self) -> Vec<String> {
        self.errors.clone()
    }

    /// Waits until the page sends the event `method` and returns its
    /// `params`. Events that arrived earlier and were not yet waited for
    /// count (the oldest matching one is taken).
    pub fn wait_event(&mut self, method: &str, deadline: Instant) -> Result<Value, String> {
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["method"] == method && self.is_ours(e))
            {
                let mut event = self.events.remove(i).unwrap_or_default();
                return Ok(event["params"].take());
            }
            let msg = self
                .recv(deadline)
                .map_err(|e| format!("waiting for {method}: {e}"))?;
            self.absorb(msg);
        }
    }

    /// Sends a page-level command on our session and returns its `result`.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        let session = self.session.clone();
        self.command(
            Some(&session),
            method,
            params,
            Instant::now() + COMMAND_TIMEOUT,
        )
    }

    /// Sends a browser-level command (no session) and returns its `result`.
    pub fn browser_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.command(None, method, params, Instant::now() + COMMAND_TIMEOUT)
    }

    /// Chromium's stderr so far, for diagnosing a failed test.
    pub fn log(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read(d.path().join("chromium.log")).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn evaluate(&mut self, js: &str, deadline: Instant) -> Result<Value, String> {
        let session = self.session.clone();
        let reply = self.command(
            Some(&session),
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
            deadline,
        )?;
        if let Some(ex) = reply.get("exceptionDetails") {
            return Err(exception_text(ex));
        }
        let result = &reply["result"];
        Ok(
            match (result.get("value"), result["unserializableValue"].as_str()) {
                (Some(v), _) => v.clone(),
                (None, Some(u)) => Value::String(u.to_string()),
                (None, None) => Value::Null,
            },
        )
    }

    fn command(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
        deadline: Instant,
    ) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        let pipe = self
            .to_browser
            .as_mut()
            .ok_or_else(|| format!("{method}: the pipe to Chromium is closed"))?;
        if let Err(e) = pipe.write_all(&bytes).and_then(|()| pipe.flush()) {
            return Err(format!(
                "{method}: cannot write to Chromium ({e}); has it died?{}",
                self.log_tail()
            ));
        }
        loop {
            let msg = self.recv(deadline).map_err(|e| format!("{method}: {e}"))?;
            if msg["id"] == id {
                if let Some(err) = msg.get("error") {
                    return Err(format!(
                        "{method} failed: {}",
                        err["message"].as_str().unwrap_or("?")
                    ));
                }
                return Ok(msg.get("result").cloned().unwrap_or(Value::Null));
            }
            // Replies to commands that timed out earlier have no taker.
            if msg.get("id").is_none() {
                self.absorb(msg);
            }
        }
    }

    /// The next message, or an error at the deadline or if Chromium closed
    /// the pipe.
    fn recv(&mut self, deadline: Instant) -> Result<Value, String> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match self.from_browser.recv_timeout(timeout) {
            Ok(msg) => msg,
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "no answer from Chromium in time{}",
                self.log_tail()
            )),
            Err(RecvTimeoutError::Disconnected) => Err(format!(
                "Chromium closed the pipe (crashed or exited){}",
                self.log_tail()
            )),
        }
    }

    /// Records an event: buffers it, and collects page errors.
    fn absorb(&mut self, event: Value) {
        if self.is_ours(&event) {
            let params = &event["params"];
            match event["method"].as_str() {
                Some("Runtime.exceptionThrown") => {
                    self.errors
                        .push(exception_text(&params["exceptionDetails"]));
                }
                Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
                    let args = params["args"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    let text: Vec<String> = args.iter().map(remote_object_text).collect();
                    self.errors
                        .push(format!("console.error: {}", text.join(" ")));
                }
                _ => {}
            }
        }
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    fn is_ours(&self, msg: &Value) -> bool {
        !self.session.is_empty() && msg["sessionId"] == self.session.as_str()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!(
                "\n--- {} stderr (last lines) ---\n{tail}",
                self.binary.display()
            )
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ask politely; Chromium exits on its own and closes the pipe.
        if let Some(mut pipe) = self.to_browser.take() {
            self.next_id += 1;
            let close = json!({"id": self.next_id, "method": "Browser.close"});
            let mut bytes = close.to_string().into_bytes();
            bytes.push(0);
            let _ = pipe.write_all(&bytes).and_then(|()| pipe.flush());
            // Dropping our end too: Chromium also exits on EOF of fd 3.
        }
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        // Then make sure: the whole process group (helpers included), and
        // the browser itself. Errors mean there was nothing left to kill.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // With every writer gone the reader sees EOF; do not hang if not.
        if let Some(reader) = self.reader.take() {
            let deadline = Instant::now() + CLOSE_TIMEOUT;
            while !reader.is_finished() && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// A `data:` URL holding `html`, for pages built inside a test.
pub fn data_url(html: &str) -> String {
    let mut url = String::from("data:text/html;charset=utf-8,");
    for b in html.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            url.push(char::from(b));
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// `$SHOAL_CHROMIUM`, else `chromium` or `chromium-browser` on `PATH`.
fn find_chromium() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SHOAL_CHROMIUM").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(format!(
                "SHOAL_CHROMIUM={} is not an executable file",
                p.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(
        "no Chromium found: install chromium (Debian: `apt-get install chromium`) \
         or set SHOAL_CHROMIUM to its path"
            .to_string(),
    )
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `s` as a JavaScript string literal (JSON strings are valid JavaScript).
fn js_string(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The text of a CDP `ExceptionDetails`: the thrown value's description
/// (e.g. `Error: boom` with its stack) if any, else the message text.
fn exception_text(details: &Value) -> String {
    details["exception"]["description"]
        .as_str()
        .or_else(|| details["text"].as_str())
        .unwrap_or("unknown exception")
        .to_string()
}

/// A console argument (`RemoteObject`) as text.
fn remote_object_text(obj: &Value) -> String {
    match (&obj["value"], obj["description"].as_str()) {
        (Value::String(s), _) => s.clone(),
        (Value::Null, Some(d)) => d.to_string(),
        (Value::Null, None) => obj["type"].as_str().unwrap_or("?").to_string(),
        (v, _) => v.to_string(),
    }
}

/// Decodes standard base64 (`A-Z a-z 0-9 + /`, `=` padding optional).
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for (i, c) in text.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b'\r' | b'\n' => continue,
            _ => return Err(format!("invalid base64 byte {c:#04x} at offset {i}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}
