//! The relay: one caller connection (kubelet's) spliced to one runtime connection at the level
//! of HTTP/2 frames.
//!
//! Calls nix-cri only forwards, which is nearly every call kubelet makes, are never taken
//! apart: their DATA frames, the runtime's answers, SETTINGS and flow control pass through
//! as the bytes that arrived. Only header blocks the caller sends are decoded (the `:path` says
//! whether nix-cri answers the call) and written out again as literal fields. Calls nix-cri
//! answers (see `intercepted`) are taken off the connection here and answered by
//! [`Proxy::handle`] on a task of their own; their answers are added to the caller's side.
//!
//! Keeping both peers' views consistent takes three rules:
//! - HPACK: the caller's encoder and the runtime's decoder would disagree once a call's header
//!   block is not forwarded, so every forwarded block is re-encoded without indexing, and the
//!   runtime's table stays empty. The runtime's blocks pass unchanged; nix-cri's own blocks
//!   to the caller use no table, so the caller's decoder keeps mirroring the runtime's encoder.
//! - Flow control: DATA the relay takes from the caller is given back to the caller with
//!   WINDOW_UPDATEs of its own. DATA the relay adds toward the caller is taken out of the
//!   caller's next connection WINDOW_UPDATEs before they reach the runtime, and the runtime's
//!   DATA waits while the caller's real window is short.
//! - Stream identifiers are the caller's on both connections; the runtime sees gaps where calls
//!   were answered here, which HTTP/2 allows.
//!
//! When the runtime cannot be reached, or goes away, the relay answers every call UNAVAILABLE
//! itself, naming the runtime's socket, and once the runtime is back it sends the caller a
//! GOAWAY so the next calls come on a new connection, spliced to the runtime again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tonic::Code;

use super::frame::{self, Frame, FrameError};
use super::hpack::{self, Decoder, Field};
use super::{Proxy, admin, grpc, upstream};

/// The most a header block may decode to. CRI calls carry a few hundred bytes of headers.
const MAX_HEADER_LIST: usize = 1 << 20;
/// How long a caller gets to send the connection preface.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one caller connection until it closes.
pub(super) async fn serve(proxy: Arc<Proxy>, admin: admin::Server, mut caller: UnixStream) {
    let mut preface = [0u8; frame::PREFACE.len()];
    match tokio::time::timeout(PREFACE_TIMEOUT, caller.read_exact(&mut preface)).await {
        Ok(Ok(_)) if &preface == frame::PREFACE => {}
        _ => {
            tracing::debug!("connection closed: no HTTP/2 preface");
            return;
        }
    }
    let upstream = UnixStream::connect(proxy.upstream().socket()).await;
    let relay = Arc::new(Relay {
        proxy,
        admin,
        state: Mutex::new(State::new()),
        to_caller_ready: Notify::new(),
        to_upstream_ready: Notify::new(),
        window_grew: Notify::new(),
    });
    let upstream = match upstream {
        Ok(stream) => {
            // The runtime gets the caller's preface, then the caller's frames as they come.
            relay.lock().to_upstream.extend_from_slice(frame::PREFACE);
            Some(stream)
        }
        Err(err) => {
            // No runtime: nix-cri is the caller's server, and starts with its own SETTINGS.
            let message = relay.proxy.upstream().unavailable_message(&err);
            relay.upstream_gone(message);
            frame::put_header(&mut relay.lock().to_caller, 0, frame::SETTINGS, 0, 0);
            None
        }
    };
    let (caller_read, mut caller_write) = caller.into_split();
    let ended = tokio::select! {
        ended = relay.read_caller(caller_read) => ended,
        () = relay.write_caller(&mut caller_write) => Ok(()),
        () = relay.relay_upstream(upstream) => Ok(()),
    };
    {
        let mut st = relay.lock();
        if let Err(err) = ended {
            tracing::debug!(%err, "caller connection failed");
            let last = st.max_stream;
            frame::put_goaway(&mut st.to_caller, last, err.code, err.what.as_bytes());
        }
        st.closed = true;
        for answer in st.answers.values() {
            if let Some(task) = &answer.task {
                task.abort();
            }
        }
    }
    relay.window_grew.notify_waiters();
    // What is queued goes out, unless the caller stops reading.
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        relay.write_caller(&mut caller_write),
    )
    .await;
}

struct Relay {
    proxy: Arc<Proxy>,
    admin: admin::Server,
    state: Mutex<State>,
    to_caller_ready: Notify,
    to_upstream_ready: Notify,
    /// Woken when the caller's windows grow: answers and runtime DATA may be waiting for room.
    window_grew: Notify,
}

struct State {
    /// Frames queued for each side, written in order by that side's writer.
    to_caller: BytesMut,
    to_upstream: BytesMut,
    /// Where caller header blocks are re-encoded, kept from call to call.
    header_block: BytesMut,
    /// The caller's connection window as it really is, for all DATA sent to it.
    caller_window: i64,
    /// DATA the relay sent the caller that the caller has not yet given back.
    injected_unacked: i64,
    /// Connection-level DATA taken off the caller's side, to give back.
    swallowed: u32,
    /// What each side's SETTINGS said.
    caller: PeerSettings,
    upstream: PeerSettings,
    /// New calls go to the runtime; else they are answered UNAVAILABLE with `unavailable`.
    forwarding: bool,
    /// The runtime connection is up (it may still be finishing calls after its GOAWAY).
    upstream_open: bool,
    unavailable: String,
    answers: HashMap<u32, Answer, StreamIds>,
    forwarded: HashMap<u32, Forwarded, StreamIds>,
    /// The highest stream the caller opened.
    max_stream: u32,
    /// Set once the relay sent the caller a GOAWAY: streams above it are refused.
    goaway_sent: Option<u32>,
    closed: bool,
}

/// A call answered here.
struct Answer {
    /// The request's header fields and body, until the request is complete.
    fields: Vec<Field>,
    body: BytesMut,
    /// The caller's window for this stream's answer.
    window: i64,
    task: Option<AbortHandle>,
    /// A call forwarded through nix-cri's client connection, not answered by nix-cri.
    forward: bool,
    /// The caller finished its request; the answer is complete.
    caller_done: bool,
    answer_done: bool,
}

/// A call forwarded to the runtime, for metrics and for answering it if the runtime goes.
struct Forwarded {
    path: Bytes,
    started: Instant,
    responded: bool,
    caller_done: bool,
    upstream_done: bool,
}

impl State {
    fn new() -> Self {
        Self {
            to_caller: BytesMut::with_capacity(16 << 10),
            to_upstream: BytesMut::with_capacity(16 << 10),
            header_block: BytesMut::with_capacity(1 << 10),
            caller_window: frame::DEFAULT_WINDOW,
            injected_unacked: 0,
            swallowed: 0,
            caller: PeerSettings::default(),
            upstream: PeerSettings::default(),
            forwarding: true,
            upstream_open: true,
            unavailable: String::new(),
            answers: HashMap::default(),
            forwarded: HashMap::default(),
            max_stream: 0,
            goaway_sent: None,
            closed: false,
        }
    }

    /// Forgets a forwarded call once both sides have ended it.
    fn forget_if_done(&mut self, stream: u32) {
        if self
            .forwarded
            .get(&stream)
            .is_some_and(|f| f.caller_done && f.upstream_done)
        {
            self.forwarded.remove(&stream);
        }
    }

    /// Gives back to the caller the connection-level DATA the relay took off its side.
    fn give_back_swallowed(&mut self) {
        if self.swallowed > 0 {
            frame::put_window_update(&mut self.to_caller, 0, self.swallowed);
            self.swallowed = 0;
        }
    }
}

/// How many calls answered here one caller connection may have open at once: what the h2
/// server before the relay advertised as its SETTINGS_MAX_CONCURRENT_STREAMS. Each holds a task
/// and its request body. Past it, a new one is refused with REFUSED_STREAM, which tells the
/// caller the call was not started (grpc-go retries it). Forwarded calls are the runtime's
/// to limit, by the SETTINGS it sends the caller.
const MAX_ANSWERS: usize = 200;

/// What a peer's SETTINGS told the relay: how large its frames and its HPACK table may be
/// (for what the relay sends it, and for decoding what the other side's encoder sends it), and
/// its streams' initial receive window (for the answers the relay sends it).
struct PeerSettings {
    max_frame: usize,
    table_limit: usize,
    initial_window: i64,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            max_frame: frame::DEFAULT_MAX_FRAME,
            table_limit: 4096,
            initial_window: frame::DEFAULT_WINDOW,
        }
    }
}

impl PeerSettings {
    /// Takes in a SETTINGS frame; returns how much every stream's window changed.
    fn apply(&mut self, settings: &Frame) -> Result<i64, FrameError> {
        let mut delta = 0;
        for (id, value) in settings.settings()? {
            match id {
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    delta += i64::from(value) - self.initial_window;
                    self.initial_window = i64::from(value);
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    self.max_frame =
                        (value as usize).clamp(frame::DEFAULT_MAX_FRAME, frame::MAX_PAYLOAD);
                }
                // The decoder allows the largest limit it was ever given (Decoder::set_limit).
                frame::SETTINGS_HEADER_TABLE_SIZE => self.table_limit = value as usize,
                _ => {}
            }
        }
        Ok(delta)
    }
}

/// Stream identifiers hash as themselves, spread by a multiply: they are the caller's own
/// counter, and a map looked up a few times per call needs no SipHash.
type StreamIds = std::hash::BuildHasherDefault<StreamIdHasher>;

#[derive(Default)]
struct StreamIdHasher(u64);

impl std::hash::Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A header block being received: HEADERS, then CONTINUATIONs until END_HEADERS. Nearly
/// every block is one frame, which is kept as it came: nothing is copied or allocated for it.
struct Block {
    stream: u32,
    end_stream: bool,
    /// The first frame's fragment, and the fragments joined once a CONTINUATION comes.
    fragment: Bytes,
    joined: Option<BytesMut>,
    /// The frames as they came, for a block that passes through unchanged.
    first_raw: Bytes,
    more_raw: Vec<Bytes>,
}

impl Block {
    fn start(frame: &Frame) -> Result<Self, FrameError> {
        Ok(Self {
            stream: frame.stream,
            end_stream: frame.has(frame::END_STREAM),
            fragment: frame.fragment()?,
            joined: None,
            first_raw: frame.raw.clone(),
            more_raw: Vec::new(),
        })
    }

    /// Adds a CONTINUATION to the block.
    fn add(&mut self, frame: &Frame) -> Result<(), FrameError> {
        if frame.kind != frame::CONTINUATION || frame.stream != self.stream {
            return Err(FrameError::protocol("header block interrupted"));
        }
        let joined = self
            .joined
            .get_or_insert_with(|| BytesMut::from(&self.fragment[..]));
        joined.extend_from_slice(&frame.fragment()?);
        self.more_raw.push(frame.raw.clone());
        if joined.len() > MAX_HEADER_LIST {
            return Err(FrameError::protocol("header block too large"));
        }
        Ok(())
    }

    /// The whole header block.
    fn fragments(&mut self) -> Bytes {
        match self.joined.take() {
            Some(joined) => joined.freeze(),
            None => self.fragment.clone(),
        }
    }
}

impl Relay {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update to the state is a few assignments with no await between them: a panic
        // in a handler task cannot leave it half-done in a way that matters more than the call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // -- caller → runtime

    async fn read_caller(self: &Arc<Self>, mut read: OwnedReadHalf) -> Result<(), FrameError> {
        let mut buf = BytesMut::with_capacity(32 << 10);
        let mut decoder = Decoder::new(MAX_HEADER_LIST);
        let mut block: Option<Block> = None;
        loop {
            match read_more(&mut read, &mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(%err, "caller read failed");
                    return Ok(());
                }
            }
            {
                let mut st = self.lock();
                // The caller's frames are for the runtime, or for nix-cri in its place.
                while let Some(frame) = frame::parse(&mut buf, st.upstream.max_frame)? {
                    match block.as_mut() {
                        Some(open) => {
                            open.add(&frame)?;
                            if !frame.has(frame::END_HEADERS) {
                                continue;
                            }
                        }
                        None if matches!(frame.kind, frame::HEADERS) => {
                            let started = Block::start(&frame)?;
                            block = Some(started);
                            if !frame.has(frame::END_HEADERS) {
                                continue;
                            }
                        }
                        None => {
                            self.caller_frame(&mut st, frame)?;
                            continue;
                        }
                    }
                    if let Some(mut complete) = block.take() {
                        decoder.set_limit(st.upstream.table_limit);
                        let fields =
                            decoder
                                .decode(&complete.fragments())
                                .map_err(|e| FrameError {
                                    code: frame::COMPRESSION_ERROR,
                                    what: format!("caller's header block: {e}"),
                                })?;
                        self.caller_headers(&mut st, complete.stream, complete.end_stream, fields);
                    }
                }
                st.give_back_swallowed();
            }
            self.to_caller_ready.notify_one();
            self.to_upstream_ready.notify_one();
            self.window_grew.notify_waiters();
        }
    }

    /// A caller frame other than a header block.
    fn caller_frame(self: &Arc<Self>, st: &mut State, frame: Frame) -> Result<(), FrameError> {
        match frame.kind {
            frame::DATA => {
                let len = frame.flow_len();
                if let Some(forwarded) = st.forwarded.get_mut(&frame.stream)
                    && st.upstream_open
                {
                    if frame.has(frame::END_STREAM) {
                        forwarded.caller_done = true;
                        st.forget_if_done(frame.stream);
                    }
                    st.to_upstream.extend_from_slice(&frame.raw);
                    return Ok(());
                }
                st.swallowed = st.swallowed.saturating_add(len as u32);
                let Some(answer) = st.answers.get_mut(&frame.stream) else {
                    return Ok(());
                };
                if answer.caller_done {
                    return Ok(());
                }
                let data = frame.data()?;
                if answer.body.len() + data.len() > upstream::MAX_MESSAGE_SIZE + 5 {
                    let message = format!(
                        "cannot read request: message larger than {} bytes",
                        upstream::MAX_MESSAGE_SIZE
                    );
                    self.refuse_answer(st, frame.stream, Code::InvalidArgument, &message);
                    return Ok(());
                }
                answer.body.extend_from_slice(&data);
                if frame.has(frame::END_STREAM) {
                    self.start_answer(st, frame.stream);
                } else if len > 0 {
                    frame::put_window_update(&mut st.to_caller, frame.stream, len as u32);
                }
            }
            frame::SETTINGS => {
                if !frame.has(frame::ACK) {
                    let delta = st.caller.apply(&frame)?;
                    for answer in st.answers.values_mut() {
                        answer.window += delta;
                    }
                    if !st.upstream_open {
                        frame::put_header(&mut st.to_caller, 0, frame::SETTINGS, frame::ACK, 0);
                        return Ok(());
                    }
                }
                if st.upstream_open {
                    st.to_upstream.extend_from_slice(&frame.raw);
                }
            }
            frame::WINDOW_UPDATE => {
                let increment = i64::from(frame.window_increment()?);
                if frame.stream == 0 {
                    st.caller_window += increment;
                    let absorbed = increment.min(st.injected_unacked);
                    st.injected_unacked -= absorbed;
                    let rest = increment - absorbed;
                    if rest > 0 && st.upstream_open {
                        frame::put_window_update(&mut st.to_upstream, 0, rest as u32);
                    }
                } else if let Some(answer) = st.answers.get_mut(&frame.stream) {
                    answer.window += increment;
                } else if st.upstream_open && st.forwarded.contains_key(&frame.stream) {
                    st.to_upstream.extend_from_slice(&frame.raw);
                }
            }
            frame::PING => {
                if frame.stream != 0 {
                    return Err(FrameError::protocol("PING on a stream other than 0"));
                }
                if frame.payload().len() != 8 {
                    return Err(FrameError {
                        code: frame::FRAME_SIZE_ERROR,
                        what: format!("PING of {} bytes, not 8", frame.payload().len()),
                    });
                }
                if frame.has(frame::ACK) {
                    // The caller's answer to the runtime's PING.
                    if st.upstream_open {
                        st.to_upstream.extend_from_slice(&frame.raw);
                    }
                } else {
                    // The caller's own PINGs are answered here, never passed on. grpc-go sends
                    // a BDP PING whenever it receives DATA, and much of that DATA is nix-cri's
                    // (answered calls). Passed on, those PINGs reach a runtime that sent no DATA
                    // in between, and grpc-go servers count such PINGs as abuse: after two they
                    // send GOAWAY ENHANCE_YOUR_CALM "too_many_pings" and close the connection
                    // (found by critest on containerd 2.x). The PING measures the caller's
                    // link, which ends here.
                    frame::put_header(&mut st.to_caller, 8, frame::PING, frame::ACK, 0);
                    st.to_caller.extend_from_slice(frame.payload());
                }
            }
            frame::RST_STREAM => {
                if let Some(answer) = st.answers.remove(&frame.stream) {
                    if let Some(task) = answer.task {
                        task.abort();
                    }
                } else if st.forwarded.remove(&frame.stream).is_some() && st.upstream_open {
                    st.to_upstream.extend_from_slice(&frame.raw);
                }
            }
            frame::CONTINUATION => {
                return Err(FrameError::protocol("CONTINUATION without HEADERS"));
            }
            _ => {
                // PRIORITY, GOAWAY and extension frames: the runtime's business, for the
                // connection and the calls it knows.
                let known = frame.stream == 0 || st.forwarded.contains_key(&frame.stream);
                if st.upstream_open && known {
                    st.to_upstream.extend_from_slice(&frame.raw);
                }
            }
        }
        Ok(())
    }

    /// A complete header block from the caller.
    fn caller_headers(
        self: &Arc<Self>,
        st: &mut State,
        stream: u32,
        end_stream: bool,
        fields: Vec<Field>,
    ) {
        if let Some(forwarded) = st.forwarded.get_mut(&stream) {
            // Trailers on a forwarded call.
            if end_stream {
                forwarded.caller_done = true;
            }
            if st.upstream_open {
                encode_for_upstream(st, stream, &fields, end_stream);
            }
            st.forget_if_done(stream);
            return;
        }
        if stream <= st.max_stream || stream.is_multiple_of(2) {
            // Trailers on a call answered here end its request; on a stream that is over,
            // they mean nothing.
            if end_stream && st.answers.contains_key(&stream) {
                self.start_answer(st, stream);
            }
            return;
        }
        st.max_stream = stream;
        if let Some(last) = st.goaway_sent
            && stream > last
        {
            frame::put_rst_stream(&mut st.to_caller, stream, frame::REFUSED_STREAM);
            return;
        }
        let path = fields
            .iter()
            .find(|f| &f.name[..] == b":path")
            .map(|f| f.value.clone())
            .unwrap_or_default();
        let answered_here = super::answered_here(&path);
        if answered_here || !st.forwarding {
            if st.answers.len() >= MAX_ANSWERS {
                frame::put_rst_stream(&mut st.to_caller, stream, frame::REFUSED_STREAM);
                return;
            }
            // Without the spliced runtime connection, calls go through nix-cri's own client
            // connection to the runtime, which reconnects when the runtime is back.
            let answer = Answer::new(fields, st.caller.initial_window, !answered_here);
            st.answers.insert(stream, answer);
            if end_stream {
                self.start_answer(st, stream);
            }
            return;
        }
        encode_for_upstream(st, stream, &fields, end_stream);
        st.forwarded.insert(
            stream,
            Forwarded {
                path,
                started: Instant::now(),
                responded: false,
                caller_done: end_stream,
                upstream_done: false,
            },
        );
    }

    // -- calls answered here

    /// The request is complete: its answer is made on a task of its own.
    fn start_answer(self: &Arc<Self>, st: &mut State, stream: u32) {
        let Some(answer) = st.answers.get_mut(&stream) else {
            return;
        };
        if answer.caller_done {
            // A second end of the same request (trailers after END_STREAM): already started.
            return;
        }
        answer.caller_done = true;
        if answer.answer_done {
            st.answers.remove(&stream);
            return;
        }
        let body = std::mem::take(&mut answer.body).freeze();
        let request = match request_of(&answer.fields, body) {
            Ok(request) => request,
            Err(why) => {
                self.refuse_answer(st, stream, Code::InvalidArgument, &why);
                return;
            }
        };
        answer.fields.clear();
        let forward = answer.forward;
        let relay = self.clone();
        let task = tokio::spawn(async move {
            let response = if forward {
                relay.forward(request).await
            } else {
                relay
                    .proxy
                    .clone()
                    .handle(request, relay.admin.clone())
                    .await
            };
            let runtime_back =
                forward && grpc::status_of(response.headers(), None) != Some(Code::Unavailable);
            relay.send_response(stream, response).await;
            if runtime_back {
                relay.move_caller_to_new_connection();
            }
            let mut st = relay.lock();
            if let Some(answer) = st.answers.get_mut(&stream) {
                answer.answer_done = true;
                if answer.caller_done {
                    st.answers.remove(&stream);
                }
            }
        });
        answer.task = Some(task.abort_handle());
    }

    /// Forwards a call through nix-cri's client connection to the runtime, as when the
    /// runtime was down at the time this connection was made, or went away since.
    async fn forward(&self, request: Request<grpc::Body>) -> Response<grpc::Body> {
        let started = Instant::now();
        let label = super::method_label(request.uri().path()).to_owned();
        let response = self.proxy.upstream().forward(request).await;
        super::observe(&label, started, response)
    }

    /// The runtime answers again: this connection cannot be spliced to it (its HPACK and
    /// SETTINGS state belong to the old runtime connection), so a GOAWAY sends the caller's
    /// next calls to a new connection, which will be. Calls under way finish here.
    fn move_caller_to_new_connection(&self) {
        let mut st = self.lock();
        if st.goaway_sent.is_some() {
            return;
        }
        let last = st.max_stream;
        frame::put_goaway(&mut st.to_caller, last, frame::NO_ERROR, b"runtime is back");
        st.goaway_sent = Some(last);
        drop(st);
        self.to_caller_ready.notify_one();
    }

    /// Answers a call with a status at once, and stops its request.
    fn refuse_answer(&self, st: &mut State, stream: u32, code: Code, message: &str) {
        let block = status_block(true, code, message);
        let max_frame = st.caller.max_frame;
        frame::put_headers(&mut st.to_caller, stream, &block, true, max_frame);
        frame::put_rst_stream(&mut st.to_caller, stream, frame::NO_ERROR);
        if let Some(answer) = st.answers.remove(&stream)
            && let Some(task) = answer.task
        {
            task.abort();
        }
    }

    async fn send_response(&self, stream: u32, response: Response<grpc::Body>) {
        let (parts, mut body) = response.into_parts();
        let mut block = BytesMut::with_capacity(128);
        hpack::encode_field(
            &mut block,
            b":status",
            parts.status.as_str().as_bytes(),
            false,
        );
        encode_headers(&mut block, &parts.headers);
        let end = body.is_end_stream();
        if !self.send_block(stream, &block, end) || end {
            return;
        }
        loop {
            match body.frame().await {
                None => {
                    self.send_data(stream, Bytes::new(), true).await;
                    return;
                }
                Some(Err(err)) => {
                    tracing::debug!(%err, "answer failed; resetting the stream");
                    let mut st = self.lock();
                    frame::put_rst_stream(&mut st.to_caller, stream, frame::CANCEL);
                    drop(st);
                    self.to_caller_ready.notify_one();
                    return;
                }
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => {
                        let end = body.is_end_stream();
                        if !self.send_data(stream, data, end).await || end {
                            return;
                        }
                    }
                    Err(f) => {
                        if let Ok(trailers) = f.into_trailers() {
                            let mut block = BytesMut::with_capacity(64);
                            encode_headers(&mut block, &trailers);
                            self.send_block(stream, &block, true);
                            return;
                        }
                    }
                },
            }
        }
    }

    /// Queues a header block of an answer; false if the caller has dropped the call.
    fn send_block(&self, stream: u32, block: &[u8], end_stream: bool) -> bool {
        let mut st = self.lock();
        if !st.answers.contains_key(&stream) {
            return false;
        }
        let max_frame = st.caller.max_frame;
        frame::put_headers(&mut st.to_caller, stream, block, end_stream, max_frame);
        drop(st);
        self.to_caller_ready.notify_one();
        true
    }

    /// Queues an answer's data as the caller's windows allow; false if the call was dropped.
    async fn send_data(&self, stream: u32, mut data: Bytes, end_stream: bool) -> bool {
        loop {
            let grew = self.window_grew.notified();
            tokio::pin!(grew);
            grew.as_mut().enable();
            {
                let mut st = self.lock();
                let max_frame = st.caller.max_frame as i64;
                let caller_window = st.caller_window;
                let Some(answer) = st.answers.get_mut(&stream) else {
                    return false;
                };
                let room = caller_window.min(answer.window).min(max_frame);
                if room > 0 || data.is_empty() {
                    let n = (room.max(0) as usize).min(data.len());
                    let chunk = data.split_to(n);
                    let last = data.is_empty() && end_stream;
                    answer.window -= n as i64;
                    st.caller_window -= n as i64;
                    st.injected_unacked += n as i64;
                    frame::put_data(&mut st.to_caller, stream, &chunk, last);
                    drop(st);
                    self.to_caller_ready.notify_one();
                    if data.is_empty() {
                        return true;
                    }
                    continue;
                }
                if st.closed {
                    return false;
                }
            }
            grew.await;
        }
    }

    // -- runtime → caller

    async fn read_upstream(&self, mut read: OwnedReadHalf) -> Result<(), String> {
        let mut buf = BytesMut::with_capacity(32 << 10);
        let mut decoder = Decoder::new(MAX_HEADER_LIST);
        let mut block: Option<Block> = None;
        let mut decoding = true;
        loop {
            match read_more(&mut read, &mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(err) => return Err(err.to_string()),
            }
            // The runtime's frames are for the caller, as large as the caller allows.
            let max_frame = self.lock().caller.max_frame;
            loop {
                let Some(frame) = frame::parse(&mut buf, max_frame).map_err(|e| e.to_string())?
                else {
                    break;
                };
                if let Some(open) = block.as_mut() {
                    open.add(&frame).map_err(|e| e.to_string())?;
                    if !frame.has(frame::END_HEADERS) {
                        continue;
                    }
                    if let Some(complete) = block.take() {
                        self.upstream_block(complete, &mut decoder, &mut decoding);
                    }
                    continue;
                }
                match frame.kind {
                    frame::HEADERS | frame::PUSH_PROMISE => {
                        let started = Block::start(&frame).map_err(|e| e.to_string())?;
                        if frame.has(frame::END_HEADERS) {
                            self.upstream_block(started, &mut decoder, &mut decoding);
                        } else {
                            block = Some(started);
                        }
                    }
                    frame::DATA => self.upstream_data(frame).await,
                    frame::CONTINUATION => {
                        return Err("the runtime sent CONTINUATION without HEADERS".into());
                    }
                    _ => self.upstream_frame(frame).map_err(|e| e.to_string())?,
                }
            }
            self.to_caller_ready.notify_one();
        }
    }

    /// The runtime's DATA, once the caller's real connection window has room for it.
    async fn upstream_data(&self, frame: Frame) {
        let len = frame.flow_len() as i64;
        loop {
            let grew = self.window_grew.notified();
            tokio::pin!(grew);
            grew.as_mut().enable();
            {
                let mut st = self.lock();
                if st.caller_window >= len || st.closed {
                    st.caller_window -= len;
                    st.to_caller.extend_from_slice(&frame.raw);
                    if frame.has(frame::END_STREAM)
                        && let Some(forwarded) = st.forwarded.get_mut(&frame.stream)
                    {
                        forwarded.upstream_done = true;
                        st.forget_if_done(frame.stream);
                    }
                    return;
                }
            }
            // What is queued must reach the caller for its window to grow.
            self.to_caller_ready.notify_one();
            grew.await;
        }
    }

    /// A header block from the runtime: passed on as it came, and decoded for the metrics.
    fn upstream_block(&self, mut block: Block, decoder: &mut Decoder, decoding: &mut bool) {
        let mut st = self.lock();
        st.to_caller.extend_from_slice(&block.first_raw);
        for raw in &block.more_raw {
            st.to_caller.extend_from_slice(raw);
        }
        if !*decoding {
            return;
        }
        decoder.set_limit(st.caller.table_limit);
        let fields = match decoder.decode(&block.fragments()) {
            Ok(fields) => fields,
            Err(err) => {
                // The caller decodes the same block and will say so; the relay only loses
                // its metrics for this connection.
                tracing::warn!(%err, "cannot decode the runtime's header block");
                *decoding = false;
                return;
            }
        };
        let Some(forwarded) = st.forwarded.get_mut(&block.stream) else {
            return;
        };
        let label = label_of(&forwarded.path);
        if !forwarded.responded {
            forwarded.responded = true;
            super::observe_latency(label, forwarded.started);
        }
        if block.end_stream {
            forwarded.upstream_done = true;
            let code = fields
                .iter()
                .find(|f| &f.name[..] == b"grpc-status")
                .and_then(|f| std::str::from_utf8(&f.value).ok()?.parse::<i32>().ok())
                .map(Code::from_i32);
            if let Some(code) = code {
                super::count_call(label, code);
            }
            st.forget_if_done(block.stream);
        }
    }

    fn upstream_frame(&self, frame: Frame) -> Result<(), FrameError> {
        let mut st = self.lock();
        match frame.kind {
            frame::SETTINGS if !frame.has(frame::ACK) => {
                st.upstream.apply(&frame)?;
            }
            frame::GOAWAY => {
                // The runtime is shutting down: calls it will not take are answered here, and
                // the caller moves to a new connection for the next ones.
                let last = frame.goaway_last_stream()?;
                st.forwarding = false;
                st.unavailable = self
                    .proxy
                    .upstream()
                    .unavailable_message(&std::io::Error::other("the runtime is going away"));
                let refused: Vec<u32> =
                    st.forwarded.keys().copied().filter(|&s| s > last).collect();
                for stream in refused {
                    fail_forwarded(&mut st, stream);
                }
                if st.goaway_sent.is_none() {
                    let max = st.max_stream;
                    frame::put_goaway(
                        &mut st.to_caller,
                        max,
                        frame::NO_ERROR,
                        b"runtime going away",
                    );
                    st.goaway_sent = Some(max);
                }
                return Ok(());
            }
            frame::RST_STREAM => {
                st.forwarded.remove(&frame.stream);
            }
            _ => {}
        }
        st.to_caller.extend_from_slice(&frame.raw);
        Ok(())
    }

    /// The runtime's connection is gone or was never there: every call from now on, and every
    /// forwarded call without its answer, is answered UNAVAILABLE with `message`.
    fn upstream_gone(&self, message: String) {
        let mut st = self.lock();
        st.forwarding = false;
        st.upstream_open = false;
        st.unavailable = message;
        let streams: Vec<u32> = st.forwarded.keys().copied().collect();
        for stream in streams {
            fail_forwarded(&mut st, stream);
        }
        // The runtime will not give back what the caller sent it; nix-cri does, and takes
        // over the connection window for what it sends.
        st.injected_unacked = 0;
        drop(st);
        self.to_caller_ready.notify_one();
        self.window_grew.notify_waiters();
    }

    /// Runs the runtime's side of the connection; if it fails, or there is none, the relay
    /// answers in its place and this waits forever.
    async fn relay_upstream(&self, upstream: Option<UnixStream>) {
        if let Some(stream) = upstream {
            let (read, mut write) = stream.into_split();
            let ended = tokio::select! {
                ended = self.read_upstream(read) => ended,
                ended = self.write_upstream(&mut write) => ended.map_err(|e| e.to_string()),
            };
            let why = ended
                .err()
                .unwrap_or_else(|| "the runtime closed the connection".to_owned());
            tracing::debug!(%why, "runtime connection ended");
            let message = self
                .proxy
                .upstream()
                .unavailable_message(&std::io::Error::other(why));
            self.upstream_gone(message);
        }
        std::future::pending().await
    }

    // -- writers

    /// Writes what is queued for the caller as it comes; returns when the connection is
    /// closed and all is written, or the caller cannot be written to.
    async fn write_caller(&self, write: &mut OwnedWriteHalf) {
        loop {
            let ready = self.to_caller_ready.notified();
            let (out, closed) = {
                let mut st = self.lock();
                (st.to_caller.split(), st.closed)
            };
            if out.is_empty() {
                if closed {
                    let _ = write.shutdown().await;
                    return;
                }
                ready.await;
                continue;
            }
            if let Err(err) = write.write_all(&out).await {
                tracing::debug!(%err, "caller write failed");
                self.lock().closed = true;
                self.window_grew.notify_waiters();
                return;
            }
        }
    }

    async fn write_upstream(&self, write: &mut OwnedWriteHalf) -> std::io::Result<()> {
        loop {
            let ready = self.to_upstream_ready.notified();
            let out = self.lock().to_upstream.split();
            if out.is_empty() {
                ready.await;
                continue;
            }
            write.write_all(&out).await?;
        }
    }
}

/// Reads what has arrived onto `buf`, keeping room for a read of 8 KiB at least; 0 at the end.
async fn read_more(read: &mut OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 8 << 10 {
        buf.reserve(32 << 10);
    }
    read.read_buf(buf).await
}

impl Answer {
    fn new(fields: Vec<Field>, window: i64, forward: bool) -> Self {
        Self {
            fields,
            body: BytesMut::new(),
            window,
            task: None,
            forward,
            caller_done: false,
            answer_done: false,
        }
    }
}

/// Answers a forwarded call UNAVAILABLE (its answer's trailers, or a whole trailers-only
/// answer), since the runtime will not.
fn fail_forwarded(st: &mut State, stream: u32) {
    let Some(forwarded) = st.forwarded.remove(&stream) else {
        return;
    };
    if forwarded.upstream_done {
        return;
    }
    let block = status_block(!forwarded.responded, Code::Unavailable, &st.unavailable);
    let max_frame = st.caller.max_frame;
    frame::put_headers(&mut st.to_caller, stream, &block, true, max_frame);
    super::count_call(label_of(&forwarded.path), Code::Unavailable);
}

/// A gRPC status as a header block: a whole trailers-only answer, or trailers.
fn status_block(whole: bool, code: Code, message: &str) -> BytesMut {
    let response = grpc::status_response(code, message);
    let mut block = BytesMut::with_capacity(128);
    if whole {
        hpack::encode_field(&mut block, b":status", b"200", false);
        encode_headers(&mut block, response.headers());
    } else {
        for name in ["grpc-status", "grpc-message"] {
            if let Some(value) = response.headers().get(name) {
                hpack::encode_field(&mut block, name.as_bytes(), value.as_bytes(), false);
            }
        }
    }
    block
}

/// Re-encodes a caller's header block for the runtime, into a buffer kept for the purpose.
fn encode_for_upstream(st: &mut State, stream: u32, fields: &[Field], end_stream: bool) {
    let mut block = std::mem::take(&mut st.header_block);
    block.clear();
    for field in fields {
        hpack::encode_field(&mut block, &field.name, &field.value, field.never_indexed);
    }
    frame::put_headers(
        &mut st.to_upstream,
        stream,
        &block,
        end_stream,
        st.upstream.max_frame,
    );
    st.header_block = block;
}

fn encode_headers(block: &mut BytesMut, headers: &HeaderMap) {
    for (name, value) in headers {
        hpack::encode_field(
            block,
            name.as_str().as_bytes(),
            value.as_bytes(),
            value.is_sensitive(),
        );
    }
}

/// The request a handler gets: method, path and headers as the caller sent them.
fn request_of(fields: &[Field], body: Bytes) -> Result<Request<grpc::Body>, String> {
    let mut request = Request::new(grpc::boxed(Full::new(body)));
    let mut headers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        match &field.name[..] {
            b":method" => {
                *request.method_mut() = http::Method::from_bytes(&field.value)
                    .map_err(|e| format!("malformed request method: {e}"))?;
            }
            b":path" => {
                *request.uri_mut() = http::Uri::from_maybe_shared(field.value.clone())
                    .map_err(|e| format!("malformed request path: {e}"))?;
            }
            name if name.starts_with(b":") => {}
            name => {
                let name = HeaderName::from_bytes(name)
                    .map_err(|e| format!("malformed request header name: {e}"))?;
                let mut value = HeaderValue::from_maybe_shared(field.value.clone())
                    .map_err(|e| format!("malformed value of request header {name}: {e}"))?;
                value.set_sensitive(field.never_indexed);
                headers.append(name, value);
            }
        }
    }
    *request.headers_mut() = headers;
    *request.version_mut() = http::Version::HTTP_2;
    Ok(request)
}

/// The metrics' method label for a path, as [`Proxy::handle`] gives it.
fn label_of(path: &[u8]) -> &str {
    super::method_label(std::str::from_utf8(path).unwrap_or(""))
}
