//! The endpoint's HTTP: one thread polling the listener and every connection, none of which
//! can hold it (non-blocking sockets, a deadline per connection, bounded requests).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use super::{CONNECTION_TIMEOUT, CONTENT_TYPE, MAX_CONNECTIONS, MAX_REQUEST};
use crate::app::Engine;

/// How often the thread looks at its stop flag and the deadlines when nothing happens.
const TICK: Duration = Duration::from_millis(100);

/// Where a connection stands.
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Reading the request's headers.
    Request,
    /// Sending the answer.
    Answer,
    /// Answer sent and the write side shut: reading what the client still sends until it
    /// closes, so that closing does not reset the connection under an answer not yet read.
    Drain,
}

struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    sent: usize,
    phase: Phase,
    deadline: Instant,
}

/// What a step of a connection leaves.
enum Next {
    Keep,
    Close,
}

/// The answer to one request: status line, headers and body.
fn answer(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn text(status: &str, body: &str) -> Vec<u8> {
    answer(status, "text/plain; charset=utf-8", body, false)
}

/// The end of the headers in `input`, if they are all there.
fn headers_end(input: &[u8]) -> Option<usize> {
    let crlf = input
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = input.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The answer to a complete request.
fn respond(request: &[u8], engine: &Engine) -> Vec<u8> {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line)
        .unwrap_or("")
        .trim_end_matches('\r');
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return text("400 Bad Request", "bad request line\n");
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return text("400 Bad Request", "bad request line\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return text("405 Method Not Allowed", "only GET and HEAD\n"),
    };
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return answer(
            "404 Not Found",
            "text/plain",
            "metrics are at /metrics\n",
            head_only,
        );
    }
    answer("200 OK", CONTENT_TYPE, &super::render(engine), head_only)
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            phase: Phase::Request,
            deadline: Instant::now() + CONNECTION_TIMEOUT,
        }
    }

    fn events(&self) -> PollFlags {
        match self.phase {
            Phase::Answer => PollFlags::OUT,
            Phase::Request | Phase::Drain => PollFlags::IN,
        }
    }

    /// Moves the connection on as far as its socket allows.
    fn step(&mut self, engine: &Engine) -> Next {
        if self.phase == Phase::Request {
            let mut buf = [0u8; 2048];
            loop {
                match self.stream.read(&mut buf) {
                    Ok(0) => return Next::Close,
                    Ok(n) => {
                        let room = (MAX_REQUEST + 1).saturating_sub(self.input.len());
                        self.input.extend_from_slice(&buf[..n.min(room)]);
                        if let Some(end) = headers_end(&self.input) {
                            self.output = respond(&self.input[..end], engine);
                            break;
                        }
                        if self.input.len() > MAX_REQUEST {
                            self.output =
                                text("431 Request Header Fields Too Large", "request too large\n");
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return Next::Close,
                }
            }
            self.input = Vec::new();
            self.phase = Phase::Answer;
        }
        if self.phase == Phase::Answer {
            while self.sent < self.output.len() {
                match self.stream.write(&self.output[self.sent..]) {
                    Ok(0) => return Next::Close,
                    Ok(n) => self.sent += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return Next::Close,
                }
            }
            if self.stream.shutdown(Shutdown::Write).is_err() {
                return Next::Close;
            }
            self.phase = Phase::Drain;
        }
        let mut buf = [0u8; 2048];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Next::Close,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
    }
}

/// Serves until `stop` is set.
pub(super) fn run(listener: TcpListener, engine: &Engine, stop: &AtomicBool) {
    let mut conns: Vec<Conn> = Vec::new();
    let tick = Timespec {
        tv_sec: 0,
        tv_nsec: TICK.as_nanos() as _,
    };
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        conns.retain(|c| c.deadline > now);
        let ready: Vec<PollFlags> = {
            let mut fds = Vec::with_capacity(conns.len() + 1);
            fds.push(PollFd::new(&listener, PollFlags::IN));
            fds.extend(conns.iter().map(|c| PollFd::new(&c.stream, c.events())));
            match rustix::event::poll(&mut fds, Some(&tick)) {
                Ok(_) => fds.iter().map(|f| f.revents()).collect(),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!(%e, "metrics endpoint: poll failed");
                    std::thread::sleep(TICK);
                    continue;
                }
            }
        };
        let mut i = 0;
        conns.retain_mut(|c| {
            i += 1;
            ready[i].is_empty() || matches!(c.step(engine), Next::Keep)
        });
        if ready[0].is_empty() {
            continue;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if conns.len() >= MAX_CONNECTIONS {
                        // The oldest makes room: stalled clients cannot lock a scrape out.
                        conns.remove(0);
                    }
                    conns.push(Conn::new(stream));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, say: the listener stays readable, so wait a little
                    // rather than spin on it.
                    tracing::warn!(%e, "metrics endpoint: accept failed");
                    std::thread::sleep(TICK);
                    break;
                }
            }
        }
    }
}
