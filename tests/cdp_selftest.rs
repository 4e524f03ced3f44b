//! Self-test of the CDP driver in `support/cdp.rs` against a real headless
//! Chromium. Without Chromium this test fails, saying to install it.

#[path = "support/cdp.rs"]
mod cdp;

use std::time::Duration;

use cdp::Browser;
use serde_json::json;

const PAGE: &str = r#"<!doctype html>
<title>cdp selftest</title>
<input id="name" value="">
<button id="go" onclick="document.querySelector('#out').textContent = document.querySelector('#name').value">Go</button>
<p id="out">nothing yet</p>
<p id="changes">0</p>
<script>
  document.querySelector('#name').addEventListener('change', () => {
    const c = document.querySelector('#changes');
    c.textContent = String(Number(c.textContent) + 1);
  });
</script>
"#;

fn launch() -> Browser {
    match Browser::launch(800, 600) {
        Ok(b) => b,
        Err(e) => panic!(
            "cannot start headless Chromium: {e}\n(this test needs a real browser: \
             install chromium, e.g. `apt-get install chromium`, or set SHOAL_CHROMIUM)"
        ),
    }
}

#[test]
fn drives_a_real_page() {
    let mut b = launch();
    b.navigate(&cdp::data_url(PAGE)).expect("navigate");
    assert_eq!(
        b.eval("document.title").expect("title"),
        json!("cdp selftest")
    );
    assert_eq!(
        b.eval("[innerWidth, innerHeight]").expect("size"),
        json!([800, 600])
    );

    b.fill("#name", "hello # shoal & co").expect("fill");
    assert_eq!(
        b.eval("document.querySelector('#changes').textContent")
            .expect("changes"),
        json!("1"),
        "fill dispatches a change event"
    );
    b.click("#go").expect("click");
    b.wait_until(
        "document.querySelector('#out').textContent === 'hello # shoal & co'",
        Duration::from_secs(5),
    )
    .expect("output follows the input");
    assert_eq!(
        b.eval("document.querySelector('#out').textContent")
            .expect("out"),
        json!("hello # shoal & co")
    );

    // Values, promises, and failures come back as such.
    assert_eq!(b.eval("1 + 1 === 3").expect("eval"), json!(false));
    assert_eq!(
        b.eval("new Promise(r => setTimeout(() => r({a: [1, 'x']}), 10))")
            .expect("promise"),
        json!({"a": [1, "x"]})
    );
    assert_eq!(b.eval("undefined").expect("undefined"), json!(null));
    let err = b.eval("no_such_variable.x").expect_err("a ReferenceError");
    assert!(err.contains("ReferenceError"), "{err}");
    let err = b.click("#missing").expect_err("no such element");
    assert!(err.contains("#missing"), "{err}");
    let err = b
        .wait_until("1 === 2", Duration::from_millis(200))
        .expect_err("never true");
    assert!(err.contains("1 === 2"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let png = dir.path().join("shot.png");
    b.screenshot(&png).expect("screenshot");
    let bytes = std::fs::read(&png).expect("read screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG: {:?}",
        &bytes[..bytes.len().min(8)]
    );
    // The IHDR chunk gives the image size: the viewport's.
    assert_eq!(
        &bytes[16..24],
        &[0, 0, 3, 32, 0, 0, 2, 88],
        "PNG is not 800x600"
    );

    assert!(b.errors().is_empty(), "no errors yet: {:?}", b.errors());
    b.eval("setTimeout(() => { window.thrown = true; throw new Error('selftest boom'); }, 0); 0")
        .expect("schedule a throw");
    b.wait_until("window.thrown === true", Duration::from_secs(5))
        .expect("thrown");
    b.eval("console.error('selftest console', 42)")
        .expect("console.error");
    let errors = b.errors();
    assert!(
        errors.iter().any(|e| e.contains("Error: selftest boom")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e == "console.error: selftest console 42"),
        "{errors:?}"
    );

    // A second navigation waits for its own load, not a stale one.
    b.navigate(&cdp::data_url("<title>second</title><p>2</p>"))
        .expect("navigate again");
    assert_eq!(b.eval("document.title").expect("title"), json!("second"));
}

#[test]
fn base64_decodes() {
    assert_eq!(cdp::base64_decode("").unwrap(), b"");
    assert_eq!(cdp::base64_decode("Zg==").unwrap(), b"f");
    assert_eq!(cdp::base64_decode("Zm8=").unwrap(), b"fo");
    assert_eq!(cdp::base64_decode("Zm9v").unwrap(), b"foo");
    assert_eq!(cdp::base64_decode("Zm9vYg").unwrap(), b"foob");
    assert_eq!(cdp::base64_decode("+/8=").unwrap(), [0xfb, 0xff]);
    assert!(cdp::base64_decode("Zm9v!").is_err());
}
