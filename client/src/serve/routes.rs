//! The HTTP side: OpenAI's endpoints on axum.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use veil_model::chat::ChatMessage;
use veil_model::{GenerateParams, SamplingParams, TextCodec};

use super::api::{ChatRequest, Common, CompletionRequest, ModelCard, Usage};
use super::error::ApiError;
use super::metrics::Metrics;
use super::network::{Source, View};
use super::worker::{Event, Job, Pool};

/// Request bodies above this are refused (413) before they are read whole.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Answer pieces buffered per request before a slow reader holds its worker back.
const EVENT_BUFFER: usize = 64;

/// The gateway once its model is ready.
#[derive(Debug)]
pub struct Ready {
    pub pool: Pool,
    pub codec: Arc<TextCodec>,
    /// Positions per sequence (prompt and answer).
    pub context: usize,
    /// Where the stages run (`GET /api/network`).
    pub network: Arc<Source>,
}

#[derive(Debug)]
pub struct AppState {
    pub model_id: String,
    pub created: u64,
    pub api_key: Option<String>,
    /// Set once the model is loaded (until then requests get 503, as llama-server's do).
    pub ready: OnceLock<Ready>,
    /// Why loading failed, if it did.
    pub failed: OnceLock<String>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    fn ready(&self) -> Result<&Ready, ApiError> {
        if let Some(r) = self.ready.get() {
            return Ok(r);
        }
        Err(match self.failed.get() {
            Some(why) => ApiError::unavailable(format!("the model could not be loaded: {why}")),
            None => ApiError::unavailable("the model is still loading"),
        })
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/api/network", get(network))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .merge(api)
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// `--api-key`: every `/v1` request must carry `Authorization: Bearer KEY`; without it any
/// token (or none) is accepted.
async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// The chat page: one self-contained file (no CDN), talking to this gateway's API.
async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.ready() {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Where each stage runs and how its nodes are doing (Veil's own; not part of OpenAI's API).
async fn network(State(state): State<Arc<AppState>>) -> Result<Json<View>, ApiError> {
    let source = state.ready()?.network.clone();
    // asking the nodes blocks for up to a few seconds
    tokio::task::spawn_blocking(move || source.view())
        .await
        .map(Json)
        .map_err(|e| ApiError::internal(format!("the network view failed: {e}")))
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [ModelCard {
            id: state.model_id.clone(),
            object: "model",
            created: state.created,
            owned_by: "veil",
        }],
    }))
}

/// The body as JSON of type `T`, or a 400/413 saying what is wrong with it.
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        let mut err = ApiError::bad_request(format!("cannot read the request body: {e}"), None);
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            err.status = StatusCode::PAYLOAD_TOO_LARGE;
            err.message = format!("the request body is over {MAX_BODY_BYTES} bytes");
        }
        err
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}"), None))
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if !m.is_empty() && m != state.model_id => {
            Err(ApiError::unknown_model(m, &state.model_id))
        }
        _ => Ok(()),
    }
}

/// Count the outcome of a request to `endpoint`.
fn counted(state: &AppState, endpoint: &str, r: Result<Response, ApiError>) -> Response {
    let r = r.unwrap_or_else(IntoResponse::into_response);
    state.metrics.count(endpoint, r.status().as_u16());
    r
}

async fn chat(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let received = Instant::now();
    let r = chat_inner(&state, body, received).await;
    counted(&state, "chat_completions", r)
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let received = Instant::now();
    let r = completions_inner(&state, body, received).await;
    counted(&state, "completions", r)
}

async fn chat_inner(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    received: Instant,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(body)?;
    check_model(state, req.model.as_deref())?;
    let ready = state.ready()?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "`messages` is empty: give at least one message",
            Some("messages".into()),
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant") => r,
            other => {
                return Err(ApiError::bad_request(
                    format!("unsupported role `{other}` (system, user and assistant are served)"),
                    Some(format!("messages[{i}].role")),
                ))
            }
        };
        messages.push(ChatMessage::new(role, &m.text(i)?));
    }
    let text = ready
        .codec
        .chat_text(&messages)
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages".into())))?;
    let prompt = ready
        .codec
        .encode_prompt(&text)
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages".into())))?;
    let max = req.max_completion_tokens.or(req.common.max_tokens);
    answer(state, ready, Kind::Chat, prompt, req.common, max, received).await
}

async fn completions_inner(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    received: Instant,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body)?;
    check_model(state, req.model.as_deref())?;
    let ready = state.ready()?;
    let text = match &req.prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return Err(ApiError::bad_request(
                "`prompt` must be one string",
                Some("prompt".into()),
            ))
        }
    };
    let prompt = ready
        .codec
        .encode_prompt(&text)
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt".into())))?;
    let max = req.common.max_tokens;
    answer(state, ready, Kind::Text, prompt, req.common, max, received).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// Validate the sampling fields, queue the request and answer it, streamed or whole.
async fn answer(
    state: &AppState,
    ready: &Ready,
    kind: Kind,
    prompt: Vec<u32>,
    common: Common,
    max_tokens: Option<u64>,
    received: Instant,
) -> Result<Response, ApiError> {
    let bad = |msg: String, param: &str| ApiError::bad_request(msg, Some(param.into()));
    if let Some(n) = common.n {
        if n != 1 {
            return Err(bad(
                format!("n = {n}: one choice per request is served"),
                "n",
            ));
        }
    }
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            format!("temperature {temperature} is outside [0, 2]"),
            "temperature",
        ));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(format!("top_p {top_p} is outside (0, 1]"), "top_p"));
    }
    if prompt.len() >= ready.context {
        let mut e = bad(
            format!(
                "the prompt has {} tokens; the model's context is {} (prompt and answer together)",
                prompt.len(),
                ready.context
            ),
            "messages",
        );
        e.code = Some("context_length_exceeded");
        return Err(e);
    }
    let room = ready.context - prompt.len();
    let max_tokens = match max_tokens {
        Some(0) => return Err(bad("max_tokens must be at least 1".into(), "max_tokens")),
        Some(m) => usize::try_from(m).unwrap_or(usize::MAX).min(room),
        None => room,
    };
    let stops = common.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > 16 {
        return Err(bad(
            format!("{} stop sequences; at most 16", stops.len()),
            "stop",
        ));
    }
    let params = GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k: 0,
            top_p,
            seed: common.seed,
        },
        top_logits: 0,
    };
    let (tx, mut rx) = mpsc::channel(EVENT_BUFFER);
    ready.pool.submit(Job {
        prompt,
        params,
        stops,
        received,
        events: tx,
    })?;
    let meta = Meta {
        id: format!(
            "{}-{:016x}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand::random::<u64>()
        ),
        created: now(),
        model: state.model_id.clone(),
        kind,
    };
    // the first event decides the status: a request that fails before any text gets an
    // error status, not a stream
    let first = rx
        .recv()
        .await
        .ok_or_else(|| ApiError::internal("the worker dropped the request"))?;
    if let Event::Failed(e) = first {
        return Err(e);
    }
    if common.stream.unwrap_or(false) {
        let usage = common
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        return Ok(Sse::new(stream_events(meta, first, rx, usage))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut text = String::new();
    let mut event = first;
    loop {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish,
                usage,
                served,
            } => {
                let mut v = meta.whole(&text, finish.as_str(), usage);
                v["veil"] = json!(served);
                return Ok(Json(v).into_response());
            }
            Event::Failed(e) => return Err(e),
        }
        event = rx
            .recv()
            .await
            .ok_or_else(|| ApiError::internal("the worker dropped the request"))?;
    }
}

/// What every response of one request repeats.
#[derive(Debug, Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn whole(&self, text: &str, finish: &str, usage: Usage) -> Value {
        match self.kind {
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
            Kind::Text => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
        }
    }

    /// One streamed chunk; `delta` is the chat delta or the completion's text.
    fn chunk(&self, delta: Value, finish: Option<&str>, with_usage: bool) -> Value {
        let mut v = match self.kind {
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            }),
            Kind::Text => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": delta, "logprobs": null, "finish_reason": finish}],
            }),
        };
        if with_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn text_delta(&self, t: &str) -> Value {
        match self.kind {
            Kind::Chat => json!({"content": t}),
            Kind::Text => json!(t),
        }
    }
}

fn data(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

/// The SSE stream of one answer: (chat) the role first, then text deltas, a last chunk with
/// the finish reason, the usage when asked for, and `[DONE]`.
fn stream_events(
    meta: Meta,
    first: Event,
    rx: mpsc::Receiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let head = match meta.kind {
        Kind::Chat => vec![data(&meta.chunk(
            json!({"role": "assistant", "content": ""}),
            None,
            include_usage,
        ))],
        Kind::Text => Vec::new(),
    };
    let events = stream::once(async move { first }).chain(stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|e| (e, rx))
    }));
    let body = events
        .scan(false, move |done, e| {
            let out: Vec<Result<SseEvent, Infallible>> = if *done {
                Vec::new()
            } else {
                match e {
                    Event::Text(t) => {
                        vec![data(&meta.chunk(meta.text_delta(&t), None, include_usage))]
                    }
                    Event::Done {
                        finish,
                        usage,
                        served,
                    } => {
                        *done = true;
                        let empty = match meta.kind {
                            Kind::Chat => json!({}),
                            Kind::Text => json!(""),
                        };
                        // who served the answer, beside OpenAI's fields (clients ignore
                        // fields they do not know)
                        let mut last = meta.chunk(empty, Some(finish.as_str()), include_usage);
                        last["veil"] = json!(served);
                        let mut v = vec![data(&last)];
                        if include_usage {
                            let mut u = meta.chunk(json!({}), None, true);
                            u["choices"] = json!([]);
                            u["usage"] = json!(usage);
                            v.push(data(&u));
                        }
                        v.push(Ok(SseEvent::default().data("[DONE]")));
                        v
                    }
                    Event::Failed(e) => {
                        *done = true;
                        vec![data(&e.body())]
                    }
                }
            };
            async move { Some(out) }
        })
        .flat_map(stream::iter);
    stream::iter(head).chain(body)
}
