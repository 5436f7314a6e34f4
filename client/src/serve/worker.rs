//! The model side of the gateway: a bounded queue of requests and worker threads that each
//! answer one request at a time on a fresh sequence (a local model's cache, or new sessions
//! on a deployment's nodes, which batch concurrent sessions' steps).

use std::ops::ControlFlow;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::error::TrySendError as EventSendError;
use veil_model::generate::generate_until;
use veil_model::tokenizer::Tokenizer;
use veil_model::{GenerateParams, StopReason, TextCodec, TokenModel};

use super::api::Usage;
use super::error::ApiError;
use super::metrics::{InFlight, Metrics};
use super::stop::StopMatcher;

/// How long a worker waits by default for a client that does not read its stream before it
/// gives up on the request (and frees its sequence); `veil serve --slow-client-timeout`.
pub const SLOW_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// One request for the model.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub stops: Vec<String>,
    /// When the request arrived (for the time to first token).
    pub received: Instant,
    /// Where the answer goes, piece by piece; when the receiver is gone (the client
    /// disconnected), generation stops.
    pub events: tokio::sync::mpsc::Sender<Event>,
}

/// Why an answer ended, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model ended its turn, or a stop sequence was met.
    Stop,
    /// `max_tokens` or the context ran out.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Debug)]
pub enum Event {
    /// Text of the answer, never part of a stop sequence.
    Text(String),
    Done {
        finish: Finish,
        usage: Usage,
        served: Served,
    },
    Failed(ApiError),
}

/// Who computed an answer: shown with it (the `veil` field of a response) and counted in
/// the gateway's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Served {
    /// Per stage, what served it at the end of the answer: a node's peer id, or
    /// `local` / `local stage I` in this process.
    pub route: Vec<String>,
    /// Stages that moved to another replica during the answer.
    pub failovers: u32,
    /// Checks of the nodes' answers by re-execution during the answer.
    pub checks: u32,
    /// Nodes caught answering wrongly (their answers were replaced by correct ones).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub caught: Vec<String>,
    /// Bytes of requests sent to nodes and of their answers (zero in this process).
    #[serde(skip)]
    pub bytes_sent: u64,
    #[serde(skip)]
    pub bytes_received: u64,
}

/// A source of fresh sequences: one per request.
pub trait Sessions: Send + 'static {
    /// Run `f` on a fresh sequence (empty cache), then release it (for a deployment: close
    /// its node sessions); says who served it.
    fn with_session(&mut self, f: &mut dyn FnMut(&mut dyn TokenModel)) -> anyhow::Result<Served>;
}

/// How the workers treat their clients.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Requests that may wait beyond those being answered.
    pub queue: usize,
    /// How long a worker waits for a client that does not read its stream.
    pub slow_client_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            queue: 32,
            slow_client_timeout: SLOW_CLIENT_TIMEOUT,
        }
    }
}

/// The queue in front of the workers.
#[derive(Debug, Clone)]
pub struct Pool {
    tx: SyncSender<Job>,
    queue: usize,
    metrics: Arc<Metrics>,
}

impl Pool {
    /// Start one thread per `Sessions`; at most `options.queue` requests wait beyond those
    /// being answered.
    pub fn start(
        workers: Vec<Box<dyn Sessions>>,
        codec: Arc<TextCodec>,
        options: PoolOptions,
        metrics: Arc<Metrics>,
    ) -> Pool {
        let queue = options.queue;
        let timeout = options.slow_client_timeout;
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for (i, mut sessions) in workers.into_iter().enumerate() {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            let codec = codec.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("veil-serve-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    let _in_flight = InFlight::start(&metrics);
                    let ctx = Ctx {
                        tokenizer: &codec.tokenizer,
                        metrics: &metrics,
                        timeout,
                    };
                    answer(sessions.as_mut(), &ctx, job);
                })
                .expect("spawn a gateway worker");
        }
        Pool { tx, queue, metrics }
    }

    /// Queue `job`, or refuse it at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        // counted before the hand-off: a worker may take it at once
        self.metrics.deferred.inc();
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.deferred.dec();
                Err(match e {
                    TrySendError::Full(_) => ApiError::busy(self.queue),
                    TrySendError::Disconnected(_) => {
                        ApiError::unavailable("the gateway's workers have stopped")
                    }
                })
            }
        }
    }
}

/// What a worker answers with.
struct Ctx<'a> {
    tokenizer: &'a Tokenizer,
    metrics: &'a Metrics,
    timeout: Duration,
}

/// Send `event`, waiting for a slow reader at most `timeout`; false when the client is gone
/// or too slow.
fn send(events: &tokio::sync::mpsc::Sender<Event>, mut event: Event, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match events.try_send(event) {
            Ok(()) => return true,
            Err(EventSendError::Closed(_)) => return false,
            Err(EventSendError::Full(e)) => {
                if Instant::now() >= deadline {
                    tracing::warn!("a client stopped reading its answer; the request is dropped");
                    return false;
                }
                event = e;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Answer one job on a fresh sequence of `sessions`.
fn answer(sessions: &mut dyn Sessions, ctx: &Ctx<'_>, job: Job) {
    let (tokenizer, metrics, timeout) = (ctx.tokenizer, ctx.metrics, ctx.timeout);
    let Job {
        prompt,
        params,
        stops,
        received,
        events,
    } = job;
    if events.is_closed() {
        return; // the client left while the request waited
    }
    let mut matcher = StopMatcher::new(stops);
    let mut stopped = false;
    let mut gone = false;
    let mut first = true;
    let mut result = None;
    let opened = sessions.with_session(&mut |model| {
        let mut on_text = |piece: &str| {
            let (text, stop) = matcher.push(piece);
            if first && !text.is_empty() {
                first = false;
                metrics
                    .time_to_first_token
                    .observe(received.elapsed().as_secs_f64());
            }
            if !text.is_empty() && !send(&events, Event::Text(text), timeout) {
                gone = true;
                return ControlFlow::Break(());
            }
            if stop {
                stopped = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        };
        result = Some(generate_until(
            model,
            tokenizer,
            &prompt,
            &params,
            &mut on_text,
        ));
    });
    if let Ok(served) = &opened {
        metrics.served(served);
    }
    if gone {
        tracing::debug!("a client disconnected; its generation was stopped");
        return;
    }
    let out = match (opened, result) {
        (Err(e), _) => {
            tracing::warn!("cannot open a sequence: {e:#}");
            send(
                &events,
                Event::Failed(ApiError::unavailable(format!(
                    "no sequence to answer with: {e:#}"
                ))),
                timeout,
            );
            return;
        }
        (Ok(served), Some(Ok(out))) => (served, out),
        (Ok(_), Some(Err(e))) => {
            tracing::warn!("generation failed: {e}");
            send(
                &events,
                Event::Failed(ApiError::unavailable(format!("generation failed: {e}"))),
                timeout,
            );
            return;
        }
        (Ok(_), None) => return,
    };
    let (served, out) = out;
    if !stopped {
        let rest = matcher.finish();
        if !rest.is_empty() && !send(&events, Event::Text(rest), timeout) {
            return;
        }
    }
    metrics.prompt_tokens.inc_by(out.prompt_tokens.len() as u64);
    metrics.tokens_predicted.inc_by(out.tokens.len() as u64);
    if out.decode_steps > 0 {
        metrics
            .decode_tokens_per_s
            .observe(out.decode_tokens_per_s());
    }
    let finish = if stopped || out.stop == StopReason::EndOfGeneration {
        Finish::Stop
    } else {
        Finish::Length
    };
    send(
        &events,
        Event::Done {
            finish,
            usage: Usage::new(out.prompt_tokens.len(), out.tokens.len()),
            served,
        },
        timeout,
    );
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::{channel, Sender};

    use veil_model::{ModelBundle, ModelError, SamplingParams};

    use super::*;

    /// Always predicts the same ordinary token; counts its steps.
    struct Fixed {
        vocab: usize,
        token: u32,
        position: usize,
        steps: Arc<AtomicUsize>,
    }

    impl TokenModel for Fixed {
        fn context_len(&self) -> usize {
            10_000
        }
        fn position(&self) -> usize {
            self.position
        }
        fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
            self.position += ids.len();
            self.steps.fetch_add(1, Ordering::SeqCst);
            let mut logits = vec![0.0; self.vocab];
            logits[self.token as usize] = 10.0;
            Ok(logits)
        }
    }

    /// Sessions that announce each request and wait for a go-ahead before answering.
    struct Gated {
        started: Sender<()>,
        go: Arc<Mutex<Receiver<()>>>,
        vocab: usize,
        token: u32,
        steps: Arc<AtomicUsize>,
    }

    impl Sessions for Gated {
        fn with_session(
            &mut self,
            f: &mut dyn FnMut(&mut dyn TokenModel),
        ) -> anyhow::Result<Served> {
            let _ = self.started.send(());
            let _ = self.go.lock().expect("lock").recv();
            f(&mut Fixed {
                vocab: self.vocab,
                token: self.token,
                position: 0,
                steps: self.steps.clone(),
            });
            Ok(Served {
                route: vec!["gated".into()],
                ..Served::default()
            })
        }
    }

    fn job(max_tokens: usize, buffer: usize) -> (Job, tokio::sync::mpsc::Receiver<Event>) {
        let (tx, rx) = tokio::sync::mpsc::channel(buffer);
        let params = GenerateParams {
            max_tokens,
            sampling: SamplingParams::default(),
            top_logits: 0,
        };
        (
            Job {
                prompt: vec![1, 2, 3],
                params,
                stops: Vec::new(),
                received: Instant::now(),
                events: tx,
            },
            rx,
        )
    }

    /// A pool of one gated worker: what it announces, its go-ahead, its step count.
    type Gate = (
        Pool,
        std::sync::mpsc::Receiver<()>,
        Sender<()>,
        Arc<AtomicUsize>,
    );

    fn pool(queue: usize) -> Gate {
        pool_with(queue, Arc::new(Metrics::new()))
    }

    fn pool_with(queue: usize, metrics: Arc<Metrics>) -> Gate {
        let options = PoolOptions {
            queue,
            ..PoolOptions::default()
        };
        pool_with_options(options, metrics)
    }

    fn pool_with_options(options: PoolOptions, metrics: Arc<Metrics>) -> Gate {
        let b = ModelBundle::tiny().expect("tiny");
        let vocab = b.weights.config.vocab_size;
        // a token that decodes to text
        let token = b.text.tokenizer.encode("word", false).expect("encode")[0];
        let (started_tx, started) = channel();
        let (go, go_rx) = channel();
        let steps = Arc::new(AtomicUsize::new(0));
        let gated = Gated {
            started: started_tx,
            go: Arc::new(Mutex::new(go_rx)),
            vocab,
            token,
            steps: steps.clone(),
        };
        let pool = Pool::start(vec![Box::new(gated)], Arc::new(b.text), options, metrics);
        (pool, started, go, steps)
    }

    #[test]
    fn a_full_queue_refuses_at_once_with_429() {
        let metrics = Arc::new(Metrics::new());
        let (pool, started, go, _) = pool_with(1, metrics.clone());
        let (a, _ra) = job(2, 64);
        pool.submit(a).expect("first");
        started.recv().expect("the worker took the first request");
        let (b, _rb) = job(2, 64);
        pool.submit(b).expect("second waits in the queue");
        let (c, _rc) = job(2, 64);
        let e = pool.submit(c).expect_err("third");
        assert_eq!(e.status.as_u16(), 429);
        assert_eq!(e.retry_after, Some(1));
        // one being answered, one waiting
        assert_eq!(metrics.processing.get() + metrics.deferred.get(), 2);
        go.send(()).expect("go");
        go.send(()).expect("go");
    }

    #[test]
    fn a_client_that_leaves_stops_its_generation() {
        let (pool, started, go, steps) = pool(4);
        // a client that reads one piece and hangs up
        let (a, mut ra) = job(5_000, 1);
        pool.submit(a).expect("submit");
        started.recv().expect("started");
        go.send(()).expect("go");
        let first = ra.blocking_recv().expect("a first piece");
        assert!(matches!(first, Event::Text(_)), "{first:?}");
        drop(ra);
        // a request that waited behind it still gets a whole answer
        let (b, mut rb) = job(3, 64);
        pool.submit(b).expect("submit");
        started.recv().expect("started");
        go.send(()).expect("go");
        let mut finish = None;
        while let Some(e) = rb.blocking_recv() {
            if let Event::Done {
                finish: f,
                usage,
                served,
            } = e
            {
                assert_eq!(usage.completion_tokens, 3);
                assert_eq!(served.route, ["gated"]);
                finish = Some(f);
            }
        }
        assert_eq!(finish, Some(Finish::Length));
        // the first generation stopped long before its 5,000 tokens
        assert!(
            steps.load(Ordering::SeqCst) < 100,
            "{} steps",
            steps.load(Ordering::SeqCst)
        );
    }

    #[test]
    fn a_client_that_stops_reading_is_dropped_after_the_timeout() {
        let metrics = Arc::new(Metrics::new());
        let timeout = Duration::from_millis(300);
        let options = PoolOptions {
            queue: 4,
            slow_client_timeout: timeout,
        };
        let (pool, started, go, steps) = pool_with_options(options, metrics.clone());
        // a client that never reads: room for one piece, then its buffer stays full
        let (a, _stalled) = job(5_000, 1);
        pool.submit(a).expect("submit");
        started.recv().expect("started");
        go.send(()).expect("go");
        let held = Instant::now();
        // a request queued behind it on the only worker
        let (b, mut rb) = job(3, 64);
        pool.submit(b).expect("submit");
        started
            .recv_timeout(Duration::from_secs(30))
            .expect("the worker let go of the stalled request");
        assert!(held.elapsed() >= timeout, "{:?}", held.elapsed());
        go.send(()).expect("go");
        let mut answered = 0;
        while let Some(e) = rb.blocking_recv() {
            if let Event::Done { usage, .. } = e {
                answered = usage.completion_tokens;
            }
        }
        assert_eq!(answered, 3);
        // the stalled generation went no further than its full buffer allowed
        let n = steps.load(Ordering::SeqCst);
        assert!(n < 10, "{n} steps");
        // and the worker is free again (it lets go just after its last event)
        let deadline = Instant::now() + Duration::from_secs(30);
        while metrics.processing.get() != 0 {
            assert!(Instant::now() < deadline, "the worker never finished");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
