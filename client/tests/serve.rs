//! `veil serve` as an OpenAI client sees it: real HTTP on a local port against the tiny
//! model (`--local --model tiny`), without an HTTP client library (requests are written by
//! hand, so what goes over the wire is exactly what a test says).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `veil serve --local --model tiny` with `extra` flags, once it is ready.
fn start(extra: &[&str]) -> Server {
    let mut args = vec!["--model", "tiny"];
    args.extend_from_slice(extra);
    start_model(&args)
}

/// `veil serve --local` with `args` (which name the model), once it is ready.
fn start_model(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(["serve", "--local", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("VEIL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start veil serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the address line");
    let addr = line
        .trim()
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("address line {line:?}"))
        .to_string();
    let server = Server { child, addr };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, _, _) = http(&server.addr, "GET", "/health", &[], None);
        if status == 200 {
            return server;
        }
        assert_eq!(status, 503, "health while loading");
        assert!(Instant::now() < deadline, "not ready after 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request on a fresh connection: status, headers (lower-case names) and body (chunked
/// transfer decoded).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write head");
    // a refused body may close the connection before it is all sent
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut rest = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let eol = rest[i..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size")
                + i;
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[i..eol])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .expect("hex size");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            i = eol + 2 + size + 2;
        }
        rest = out;
    }
    (
        status,
        headers,
        String::from_utf8(rest).expect("utf-8 body"),
    )
}

fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = http(
        &server.addr,
        "POST",
        path,
        &[],
        Some(body.to_string().as_bytes()),
    );
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body: {text}")),
    )
}

/// The `data:` payloads of an SSE body.
fn sse(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Run `tests/data/SCRIPT` with `args`, Python packages from `site`: success, stdout, stderr.
fn python(script: &str, args: &[&str], site: &str) -> (bool, String, String) {
    let out = Command::new("python3")
        .arg(format!(
            "{}/tests/data/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args(args)
        .env("PYTHONPATH", site)
        .output()
        .expect("run python3");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn chat(content: &str, extra: Value) -> Value {
    let mut v = json!({
        "model": "tiny",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 12,
        "some_field_openai_ignores": {"x": 1},
    });
    for (k, x) in extra.as_object().expect("object") {
        v[k] = x.clone();
    }
    v
}

fn streamed_text(server: &Server, body: &Value) -> (Vec<Value>, String) {
    let (status, headers, text) = http(
        &server.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(body.to_string().as_bytes()),
    );
    assert_eq!(status, 200, "{text}");
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")));
    let events = sse(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk JSON"))
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    (chunks, content)
}

#[test]
fn chat_completions_whole_and_streamed_agree() {
    let server = start(&["--parallel", "2"]);
    let (status, models) = {
        let (s, _, t) = http(&server.addr, "GET", "/v1/models", &[], None);
        (s, serde_json::from_str::<Value>(&t).expect("json"))
    };
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["object"], "model");

    let (status, whole) = post(
        &server,
        "/v1/chat/completions",
        &chat("Say hello.", json!({})),
    );
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert!(whole["id"]
        .as_str()
        .is_some_and(|i| i.starts_with("chatcmpl-")));
    let choice = &whole["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    let usage = &whole["usage"];
    let (p, c) = (
        usage["prompt_tokens"].as_u64(),
        usage["completion_tokens"].as_u64(),
    );
    let (p, c) = (p.expect("prompt"), c.expect("completion"));
    assert!(p > 5 && (1..=12).contains(&c), "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(p + c));
    let finish = choice["finish_reason"].as_str().expect("finish");
    assert!(
        finish == "stop" || (finish == "length" && c == 12),
        "{whole}"
    );

    // the same request streamed: role first, the same text, the finish, the usage
    let body = chat(
        "Say hello.",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (chunks, streamed) = streamed_text(&server, &body);
    assert_eq!(streamed, text);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"].as_u64(), Some(c));
    let finish_chunk = &chunks[chunks.len() - 2];
    assert_eq!(finish_chunk["choices"][0]["finish_reason"], finish);
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));

    // max_completion_tokens wins over max_tokens
    let (_, short) = post(
        &server,
        "/v1/chat/completions",
        &chat("Say hello.", json!({"max_completion_tokens": 3})),
    );
    assert!(
        short["usage"]["completion_tokens"].as_u64() <= Some(3),
        "{short}"
    );

    // a stop sequence taken from the middle of the answer cuts it there, on text
    let chars: Vec<char> = text.chars().collect();
    if chars.len() >= 6 {
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
        let at = text.find(&stop).expect("in the text");
        for stream in [false, true] {
            let body = chat(
                "Say hello.",
                json!({"stop": [stop.clone(), "\u{1F600}"], "stream": stream}),
            );
            let got = if stream {
                streamed_text(&server, &body).1
            } else {
                let (_, v) = post(&server, "/v1/chat/completions", &body);
                assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .expect("text")
                    .to_string()
            };
            assert_eq!(got, text[..at], "stop {stop:?} in {text:?}");
        }
    } else {
        eprintln!("answer {text:?} too short for the stop-sequence check");
    }

    // the completions endpoint takes raw text
    let (status, comp) = post(
        &server,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(status, 200, "{comp}");
    assert_eq!(comp["object"], "text_completion");
    assert!(comp["choices"][0]["text"].is_string());
    assert!(comp["usage"]["completion_tokens"].as_u64() <= Some(5));

    // Prometheus metrics count what was served. A request stops counting as processing
    // when its handler ends, which may be just after the client has read the last byte.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, headers, metrics) = loop {
        let got = http(&server.addr, "GET", "/metrics", &[], None);
        if got.2.contains("veil_requests_processing 0") || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.contains("openmetrics")));
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in\n{metrics}"))
    };
    assert!(
        value("veil_prompt_tokens_total") >= (4 * p) as f64,
        "{metrics}"
    );
    assert!(
        value("veil_tokens_predicted_total") >= c as f64,
        "{metrics}"
    );
    assert_eq!(value("veil_requests_processing"), 0.0);
    assert_eq!(value("veil_requests_deferred"), 0.0);
    assert!(value(r#"veil_requests_total{endpoint="completions",status="200"}"#) >= 1.0);
    assert!(value(r#"veil_requests_total{endpoint="chat_completions",status="200"}"#) >= 3.0);
    assert!(
        value("veil_time_to_first_token_seconds_count") >= 4.0,
        "{metrics}"
    );
}

#[test]
fn concurrent_streams_equal_their_runs_alone() {
    let server = start(&["--parallel", "4"]);
    let prompts: Vec<String> = (0..6)
        .map(|i| format!("Tell me about the number {i}."))
        .collect();
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| streamed_text(&server, &chat(p, json!({"stream": true}))).1)
        .collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let server = &server;
                s.spawn(move || streamed_text(server, &chat(p, json!({"stream": true}))).1)
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(together, alone);
}

#[test]
fn bad_requests_get_openai_shaped_errors() {
    let server = start(&["--ctx", "64"]);
    let check = |status: u16, body: &str, want: u16, needle: &str| {
        assert_eq!(status, want, "{body}");
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON: {body}"));
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains(needle)),
            "{v}"
        );
        assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some());
    };
    let send = |path: &str, body: &[u8]| {
        let (s, _, t) = http(&server.addr, "POST", path, &[], Some(body));
        (s, t)
    };
    let (s, t) = send("/v1/chat/completions", b"{not json");
    check(s, &t, 400, "not valid");
    let (s, t) = send("/v1/chat/completions", br#"{"messages": []}"#);
    check(s, &t, 400, "empty");
    let (s, t) = send(
        "/v1/chat/completions",
        chat("x", json!({"temperature": "hot"}))
            .to_string()
            .as_bytes(),
    );
    check(s, &t, 400, "not valid");
    let (s, t) = send(
        "/v1/chat/completions",
        chat("x", json!({"n": 2})).to_string().as_bytes(),
    );
    check(s, &t, 400, "one choice");
    let (s, t) = send(
        "/v1/chat/completions",
        chat("x", json!({"model": "gpt-4o"})).to_string().as_bytes(),
    );
    check(s, &t, 404, "gpt-4o");
    let (s, t) = send(
        "/v1/chat/completions",
        chat(
            "x",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        )
        .to_string()
        .as_bytes(),
    );
    check(s, &t, 400, "image_url");
    let long = "many words ".repeat(200);
    let (s, t) = send(
        "/v1/chat/completions",
        chat(&long, json!({})).to_string().as_bytes(),
    );
    check(s, &t, 400, "context");
    assert!(t.contains("context_length_exceeded"), "{t}");
    let (s, t) = send("/v1/chat/completions", &vec![b' '; 2 << 20]);
    check(s, &t, 413, "bytes");
    let (s, t) = send("/v1/embeddings", b"{}");
    check(s, &t, 404, "/v1/embeddings");
    // the gateway still answers after all that
    let (s, v) = post(
        &server,
        "/v1/chat/completions",
        &chat("ok?", json!({"max_tokens": 2})),
    );
    assert_eq!(s, 200, "{v}");
}

#[test]
fn an_api_key_is_required_when_set() {
    let server = start(&["--api-key", "s3cret"]);
    let body = chat("hi", json!({"max_tokens": 2})).to_string();
    for (headers, want) in [
        (vec![], 401),
        (vec![("Authorization", "Bearer wrong")], 401),
        (vec![("Authorization", "Bearer s3cret")], 200),
    ] {
        let (s, _, t) = http(
            &server.addr,
            "POST",
            "/v1/chat/completions",
            &headers,
            Some(body.as_bytes()),
        );
        assert_eq!(s, want, "{headers:?}: {t}");
        if want == 401 {
            assert!(t.contains("invalid_api_key"), "{t}");
        }
    }
    // health stays open (load balancers probe it); the network view and metrics do not
    assert_eq!(http(&server.addr, "GET", "/health", &[], None).0, 200);
    for path in ["/api/network", "/metrics"] {
        assert_eq!(http(&server.addr, "GET", path, &[], None).0, 401, "{path}");
        let auth = [("Authorization", "Bearer s3cret")];
        assert_eq!(
            http(&server.addr, "GET", path, &auth, None).0,
            200,
            "{path}"
        );
    }
}

/// `GET /api/network` as JSON.
fn network_view(server: &Server) -> Value {
    let (status, _, text) = http(&server.addr, "GET", "/api/network", &[], None);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("JSON view")
}

#[test]
fn the_network_view_and_each_answer_say_where_the_stages_ran() {
    let plain = start(&[]);
    let view = network_view(&plain);
    assert_eq!(view["mode"], "local", "{view}");
    assert_eq!(view["stages"].as_array().map(Vec::len), Some(1), "{view}");
    assert_eq!(view["stages"][0]["layers"], json!([0, 4]), "{view}");
    let ask = json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0});
    let (status, whole) = post(&plain, "/v1/completions", &ask);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(
        whole["veil"],
        json!({"route": ["local"], "failovers": 0, "checks": 0})
    );

    // encrypted stages in this process (exact f32 shards): the same answer, through two
    // stages that cover the model's layers in order
    let encrypted = start(&["--encrypted", "--stages", "2", "--quant", "f32"]);
    let view = network_view(&encrypted);
    assert_eq!(view["mode"], "local-encrypted", "{view}");
    let key = view["key"].as_str().expect("key fingerprint");
    assert!(
        key.len() >= 8 && key.chars().all(|c| c.is_ascii_hexdigit()),
        "{key}"
    );
    let stages = view["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 2, "{view}");
    assert_eq!(stages[0]["layers"][0], 0);
    assert_eq!(stages[0]["layers"][1], stages[1]["layers"][0]);
    assert_eq!(stages[1]["layers"][1], 4);
    let (status, enc) = post(&encrypted, "/v1/completions", &ask);
    assert_eq!(status, 200, "{enc}");
    assert_eq!(enc["choices"][0]["text"], whole["choices"][0]["text"]);
    let route = json!(["local stage 0", "local stage 1"]);
    assert_eq!(enc["veil"]["route"], route, "{enc}");
    // streamed, the route rides on the chunk that ends the answer
    let (chunks, _) = streamed_text(&encrypted, &chat("hi", json!({"stream": true})));
    let last = chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .expect("a finishing chunk");
    assert_eq!(last["veil"]["route"], route, "{last}");
}

#[test]
fn the_readme_curl_examples_work() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("### The OpenAI-compatible gateway")
        .nth(1)
        .and_then(|s| s.split("```sh").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("the gateway section's commands");
    // each `curl` command with its continuation lines
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in section.lines() {
        if line.starts_with("curl ") || !current.is_empty() {
            current.push_str(line.trim_end_matches('\\'));
            current.push(' ');
            if !line.ends_with('\\') {
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    assert_eq!(commands.len(), 2, "{section}");
    let server = start(&[]);
    for (i, cmd) in commands.iter().enumerate() {
        let cmd = cmd.replace("http://127.0.0.1:8080", &format!("http://{}", server.addr));
        let out = Command::new("bash")
            .args(["-c", &cmd])
            .output()
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i == 0 {
            let v: Value = serde_json::from_str(&stdout).expect("a JSON answer");
            assert_eq!(v["object"], "chat.completion", "{v}");
        } else {
            let events = sse(&stdout);
            assert_eq!(
                events.last().map(String::as_str),
                Some("[DONE]"),
                "{stdout}"
            );
            assert!(events.iter().any(|e| e.contains("\"usage\":{")), "{stdout}");
        }
    }
}

#[test]
fn a_model_that_cannot_load_ends_the_gateway_with_the_reason() {
    let home = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args([
            "serve",
            "--deployment",
            "d-nothere",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("VEIL_HOME", home.path())
        .env("VEIL_LOG", "warn")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no deployment `d-nothere`"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(["serve"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--local --model M, or --deployment D"));
}

#[test]
fn the_official_openai_client_works() {
    // scripts/test.sh installs the `openai` package and points VEIL_OPENAI_SITE at it
    let site = std::env::var("VEIL_OPENAI_SITE").unwrap_or_default();
    let server = start(&["--parallel", "4"]);
    let (ok, stdout, stderr) = python(
        "openai_client.py",
        &[&format!("http://{}", server.addr), "tiny"],
        &site,
    );
    assert!(
        !stderr.contains("No module named 'openai'"),
        "the `openai` package is missing: run scripts/test.sh (it installs it), or set \
         VEIL_OPENAI_SITE to a directory that holds it"
    );
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

#[test]
fn ctrl_c_lets_the_answers_in_flight_finish() {
    let mut server = start(&["--ctx", "4096"]);
    let addr = server.addr.clone();
    let body = chat("Go on.", json!({"max_tokens": 3000, "stream": true})).to_string();
    let answer = std::thread::spawn(move || {
        let r = http(
            &addr,
            "POST",
            "/v1/chat/completions",
            &[],
            Some(body.as_bytes()),
        );
        (r, Instant::now())
    });
    // wait until the request is being answered, then interrupt the gateway
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let metrics = http(&server.addr, "GET", "/metrics", &[], None).2;
        if metrics.contains("veil_requests_processing 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = Command::new("kill")
        .args(["-INT", &server.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let killed = Instant::now();
    let ((code, _, text), finished) = answer.join().expect("request thread");
    // the answer was still streaming when the signal came (3,000 tokens take far longer
    // than the polling above)
    assert!(finished > killed, "the answer ended before the signal");
    assert_eq!(code, 200);
    let events = sse(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let exit = server.child.wait().expect("wait");
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn the_page_is_served_whole_from_the_binary() {
    let server = start(&["--api-key", "k"]);
    // the page itself needs no key (its requests carry the one the user types)
    let (status, headers, page) = http(&server.addr, "GET", "/", &[], None);
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/html")));
    assert!(page.contains("<title>Veil</title>") && page.contains("/v1/chat/completions"));
    // nothing is loaded from elsewhere: no CDN, no remote fonts
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "external URL in the page"
    );
}

#[test]
fn the_page_chats_in_a_headless_browser() {
    // scripts/test.sh installs chromium, chromedriver and selenium (VEIL_SELENIUM_SITE)
    let site = std::env::var("VEIL_SELENIUM_SITE").unwrap_or_default();
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists()
            && std::path::Path::new("/usr/bin/chromedriver").exists(),
        "chromium and chromedriver are missing: run scripts/test.sh (it installs them)"
    );
    // SmolLM2 (scripts/test.sh fetches it): fast enough to chat, slow enough that a long
    // answer is still streaming when the Stop button is clicked; encrypted in two stages in
    // this process, so the page shows a route
    let server = start_model(&["--model", "smollm2", "--encrypted", "--stages", "2"]);
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("veil-page.png");
    let url = format!("http://{}", server.addr);
    let (ok, stdout, stderr) = python(
        "browser.py",
        &[&url, shot.to_str().expect("utf-8"), "2"],
        &site,
    );
    assert!(
        !stderr.contains("No module named 'selenium'"),
        "selenium is missing: run scripts/test.sh, or set VEIL_SELENIUM_SITE"
    );
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("{stdout}screenshot: {}", shot.display());
}
