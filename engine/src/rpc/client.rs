//! A JSON-RPC client for the CLI: one connection, one request at a time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No server at the socket.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The connection broke or the reply was not JSON-RPC.
    #[error("RPC transport: {0}")]
    Transport(String),
    /// The server answered with an error.
    #[error("{message} (code {code})")]
    Reply {
        /// JSON-RPC code.
        code: i64,
        /// Message.
        message: String,
    },
}

/// A connection to the engine.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    /// Connects to the socket.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
        let writer = stream
            .try_clone()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        })
    }

    /// Calls `method` and returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let t = |e: std::io::Error| ClientError::Transport(e.to_string());
        self.writer
            .write_all(format!("{req}\n").as_bytes())
            .map_err(t)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(t)? == 0 {
            return Err(ClientError::Transport(
                "the server closed the connection".into(),
            ));
        }
        let reply: Value = serde_json::from_str(&line)
            .map_err(|e| ClientError::Transport(format!("bad reply: {e}")))?;
        if let Some(err) = reply.get("error") {
            return Err(ClientError::Reply {
                code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string(),
            });
        }
        reply
            .get("result")
            .cloned()
            .ok_or_else(|| ClientError::Transport("reply without result".into()))
    }
}
