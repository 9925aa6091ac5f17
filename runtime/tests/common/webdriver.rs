//! Headless Chromium from Debian (packages `chromium`, `chromium-driver`),
//! driven over the W3C WebDriver protocol: `chromedriver` on a free loopback
//! port, spoken to with the blocking HTTP client of `common`.
//!
//! Missing Chromium fails the test with how to install it: never a skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The key W3C WebDriver names an element reference with.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A `chromedriver` process and one headless Chromium session.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

/// An element of the page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub fn start() -> Browser {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(path).exists(),
                "{path} not found: this test drives headless Chromium from Debian; install it with \
                 `apt-get install chromium chromium-driver` (scripts/test does, as root) [{package}]"
            );
        }
        let port = super::closed_port().port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, status)) = call(addr, "GET", "/status", b"")
                && status["value"]["ready"] == true
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on {addr} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1600"]
            }
        }}});
        let value = browser.command("POST", "/session", &caps);
        browser.session = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {value}"))
            .to_owned();
        browser
    }

    /// Sends a WebDriver command; its `value`, or a panic with the driver's error.
    fn command(&self, method: &str, path: &str, body: &Value) -> Value {
        let body = if method == "GET" {
            Vec::new()
        } else {
            serde_json::to_vec(body).expect("json")
        };
        let (status, v) = call(self.addr, method, path, &body)
            .unwrap_or_else(|e| panic!("chromedriver {method} {path}: {e}"));
        assert_eq!(status, 200, "chromedriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn session_command(&self, method: &str, path: &str, body: &Value) -> Value {
        self.command(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) {
        self.session_command("POST", "/url", &json!({ "url": url }));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its result.
    pub fn eval(&self, script: &str, args: Value) -> Value {
        self.session_command(
            "POST",
            "/execute/sync",
            &json!({ "script": script, "args": args }),
        )
    }

    /// The first element matching the CSS `selector`, once there is one.
    pub fn wait_for(&self, selector: &str, limit: Duration) -> Element<'_> {
        let deadline = Instant::now() + limit;
        loop {
            let found = self.eval(
                "return document.querySelector(arguments[0]);",
                json!([selector]),
            );
            if let Some(id) = found.get(ELEMENT).and_then(Value::as_str) {
                return Element {
                    browser: self,
                    id: id.to_owned(),
                };
            }
            assert!(
                Instant::now() < deadline,
                "no element `{selector}` after {limit:?}; the page shows:\n{}",
                self.text("body")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The rendered text of the first element matching `selector` ("" if none).
    pub fn text(&self, selector: &str) -> String {
        self.eval(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            json!([selector]),
        )
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Polls `check` on the text of `selector` until it holds; its last text.
    pub fn wait_text(
        &self,
        selector: &str,
        limit: Duration,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.text(selector);
            if check(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "`{selector}` never showed what was expected after {limit:?}; it shows:\n{text}\n\nthe page:\n{}",
                self.text("body")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG of the window to `path`.
    pub fn screenshot(&self, path: &Path) -> PathBuf {
        let png = self.session_command("GET", "/screenshot", &Value::Null);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("base64 screenshot"))
            .expect("screenshot is base64");
        std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path.to_path_buf()
    }
}

impl Element<'_> {
    fn command(&self, method: &str, action: &str, body: &Value) -> Value {
        self.browser
            .session_command(method, &format!("/element/{}/{action}", self.id), body)
    }

    /// Scrolls the element into view and clicks it.
    pub fn click(&self) {
        self.browser.eval(
            "arguments[0].scrollIntoView({block: 'center'});",
            json!([{ ELEMENT: self.id }]),
        );
        self.command("POST", "click", &json!({}));
    }

    /// Replaces the text of an input or textarea, as typed.
    pub fn fill(&self, text: &str) {
        self.command("POST", "clear", &json!({}));
        self.command("POST", "value", &json!({ "text": text }));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = call(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                b"",
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One HTTP/1.1 exchange with chromedriver, which keeps connections open:
/// the answer is read by its `Content-Length`.
fn call(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Value)> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut length = None;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let length = length.ok_or_else(|| bad("no Content-Length".into()))?;
    let mut bytes = vec![0; length];
    reader.read_exact(&mut bytes)?;
    let value = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("{e}: {}", String::from_utf8_lossy(&bytes))))?;
    Ok((status, value))
}
