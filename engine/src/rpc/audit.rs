//! The audit trail of the control plane: every call of a method that changes the engine's state
//! is one line at info (target `engine::rpc::audit`) with its method, its parameters and its
//! result or error; other calls are one line at debug. Secrets never reach the log: a parameter
//! (at any depth) whose name contains one of [`SENSITIVE`], or that its method names, is
//! replaced by [`REDACTED`], in the parameters and the result alike.

use serde_json::Value;

use super::RpcError;

/// Parts of a parameter's name that mark it secret.
pub const SENSITIVE: [&str; 4] = ["key", "secret", "psk", "password"];
/// What a secret value is logged as.
pub const REDACTED: &str = "<redacted>";
/// Longest parameters or result logged; longer ones (a whole configuration) are cut, saying
/// how long they were.
pub const MAX_LOGGED: usize = 2048;

/// What a call is logged with, taken before its parameters go to the handler.
pub(super) struct Audit {
    method: &'static str,
    changes_state: bool,
    redact: &'static [&'static str],
    /// `None` when the line would not be logged at the current level: a split of a thousand
    /// pairs does not serialize its parameters and result for nothing.
    params: Option<String>,
}

impl Audit {
    /// The logged form of a call of `method` with `params`; `redact` names parameters to hide
    /// beyond those [`SENSITIVE`] marks.
    pub(super) fn new(
        method: &'static str,
        changes_state: bool,
        redact: &'static [&'static str],
        params: &Value,
    ) -> Self {
        let logged = if changes_state {
            tracing::enabled!(tracing::Level::INFO)
        } else {
            tracing::enabled!(tracing::Level::DEBUG)
        };
        Self {
            method,
            changes_state,
            redact,
            params: logged.then(|| short(&redacted(params, redact))),
        }
    }

    /// Logs the call's outcome: at info for a method that changes state, else at debug.
    pub(super) fn record(self, result: &Result<Value, RpcError>) {
        let Some(params) = self.params.as_deref() else {
            return;
        };
        let method = self.method;
        match (self.changes_state, result) {
            (true, Ok(r)) => {
                let result = short(&redacted(r, self.redact));
                tracing::info!(method, %params, %result, "rpc call done");
            }
            (true, Err(e)) => tracing::info!(
                method,
                %params,
                error_code = e.code,
                error = e.message.as_str(),
                "rpc call failed"
            ),
            (false, Ok(_)) => tracing::debug!(method, %params, "rpc call done"),
            (false, Err(e)) => tracing::debug!(
                method,
                %params,
                error_code = e.code,
                error = e.message.as_str(),
                "rpc call failed"
            ),
        }
    }
}

/// True when a value named `name` must not be logged.
fn sensitive(name: &str, also: &[&str]) -> bool {
    let lower = name.to_ascii_lowercase();
    SENSITIVE.iter().any(|s| lower.contains(s)) || also.contains(&name)
}

/// `v` with every sensitive member, at any depth, replaced by [`REDACTED`].
pub fn redacted(v: &Value, also: &[&str]) -> Value {
    match v {
        Value::Object(members) => Value::Object(
            members
                .iter()
                .map(|(k, v)| {
                    let v = match sensitive(k, also) {
                        true => Value::from(REDACTED),
                        false => redacted(v, also),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|i| redacted(i, also)).collect()),
        other => other.clone(),
    }
}

/// `v` as compact JSON, cut after [`MAX_LOGGED`] bytes (on a character boundary).
pub fn short(v: &Value) -> String {
    let mut text = v.to_string();
    if text.len() > MAX_LOGGED {
        let total = text.len();
        let mut cut = MAX_LOGGED;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(&format!("... ({total} bytes)"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_redacted_at_any_depth_and_the_rest_kept() {
        let p = json!({
            "nqn": "nqn.2026-01.io.quicksplit:a",
            "hosts": [{"nqn": "nqn.host", "dhchap_key": "key0", "dhchap_ctrlr_key": "key1"}],
            "tls": {"psk_key": "k", "Password": "hunter2", "ca_file": "/etc/ca.pem"},
            "client_secret": "s",
            "token": "t",
        });
        let r = redacted(&p, &["token"]);
        assert_eq!(
            r,
            json!({
                "nqn": "nqn.2026-01.io.quicksplit:a",
                "hosts": [{"nqn": "nqn.host", "dhchap_key": REDACTED, "dhchap_ctrlr_key": REDACTED}],
                "tls": {"psk_key": REDACTED, "Password": REDACTED, "ca_file": "/etc/ca.pem"},
                "client_secret": REDACTED,
                "token": REDACTED,
            })
        );
        let text = short(&r);
        for secret in ["key0", "key1", "hunter2", "\"s\"", "\"t\""] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }

    #[test]
    fn long_values_are_cut_and_say_their_length() {
        let v = json!({"name": "é".repeat(MAX_LOGGED)});
        let total = v.to_string().len();
        let s = short(&v);
        assert!(s.len() < MAX_LOGGED + 40, "{} bytes", s.len());
        assert!(s.ends_with(&format!("... ({total} bytes)")), "{s}");
        assert_eq!(short(&json!({"name": "p0"})), r#"{"name":"p0"}"#);
    }
}
