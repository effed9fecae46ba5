//! The log: what `quicksplit` writes on stderr, and the level `log_set_level` changes while the
//! engine runs.
//!
//! Lines are text (colours only when stderr is a terminal and `NO_COLOR` is unset or empty, so
//! a log file holds no escape sequences) or one JSON object per line, the event's fields at the
//! top level beside `timestamp`, `level`, `target` and `message`. The filter is an `EnvFilter`
//! behind a reload layer: `QUICKSPLIT_LOG` gives the first one, `log_set_level` replaces it.
//! The subscriber is global to the process, so the handle that reloads it is too.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer, Registry};

/// The variable holding the initial filter (a level or `EnvFilter` directives).
pub const ENV_FILTER: &str = "QUICKSPLIT_LOG";
/// The filter when `QUICKSPLIT_LOG` is unset or unusable.
pub const DEFAULT_FILTER: &str = "info";
/// The level names a filter may be.
pub const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format '{other}' (text or json)")),
        }
    }
}

/// Errors changing the log filter.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The filter is not a level or a list of directives.
    #[error("{0}")]
    Invalid(String),
    /// This process installed no reloadable subscriber (the library used on its own).
    #[error(
        "the log level cannot be changed in this process: its logging was not set up by quicksplit"
    )]
    NotInstalled,
    /// The subscriber is gone.
    #[error("the log level could not be changed: {0}")]
    Reload(String),
}

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// True when log lines may carry ANSI colours: stderr is a terminal and `NO_COLOR` is unset or
/// empty (<https://no-color.org>).
pub fn colours_wanted() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// Installs the process's subscriber on stderr in `format`, filtered by `QUICKSPLIT_LOG` (or
/// `info`). A second call, or one after another subscriber was installed, changes nothing.
pub fn init(format: LogFormat) {
    // The variable is read as it always was (any `EnvFilter` directives); only what
    // `log_set_level` is given is held to the stricter form.
    let from_env = std::env::var(ENV_FILTER).ok().map(|spec| {
        let parsed = EnvFilter::builder().parse(&spec);
        (spec, parsed)
    });
    let (initial, unusable) = match from_env {
        Some((_, Ok(f))) => (f, None),
        Some((spec, Err(e))) => (EnvFilter::new(DEFAULT_FILTER), Some((spec, e))),
        None => (EnvFilter::new(DEFAULT_FILTER), None),
    };
    let (filter, handle) = reload::Layer::new(initial);
    let lines = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colours_wanted())
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
        if let Some((spec, e)) = unusable {
            tracing::warn!(
                "{ENV_FILTER}='{spec}' is not a usable filter ({e}): logging at {DEFAULT_FILTER}"
            );
        }
    }
}

/// Parses a filter: a level (`error`, `warn`, `info`, `debug`, `trace`, `off`) or `EnvFilter`
/// directives separated by commas, each a level or `target=level`. A bare word that is not a
/// level is refused: `EnvFilter` would take it as a target name and quietly enable everything
/// there.
pub fn parse_filter(spec: &str) -> Result<EnvFilter, LogError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err(LogError::Invalid(format!(
            "the level is empty: give one of {} or directives such as 'info,engine::rpc=debug'",
            LEVELS.join(", ")
        )));
    }
    for directive in spec.split(',').map(str::trim) {
        let is_level = LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive));
        if directive.is_empty() || !(is_level || directive.contains('=')) {
            return Err(LogError::Invalid(format!(
                "'{directive}' is neither a level ({}) nor a target=level directive",
                LEVELS.join(", ")
            )));
        }
    }
    EnvFilter::builder()
        .parse(spec)
        .map_err(|e| LogError::Invalid(format!("'{spec}': {e}")))
}

/// Replaces the filter; gives the one now in force.
pub fn set_level(spec: &str) -> Result<String, LogError> {
    let filter = parse_filter(spec)?;
    let handle = FILTER.get().ok_or(LogError::NotInstalled)?;
    handle
        .reload(filter)
        .map_err(|e| LogError::Reload(e.to_string()))?;
    level()
}

/// The filter in force.
pub fn level() -> Result<String, LogError> {
    let handle = FILTER.get().ok_or(LogError::NotInstalled)?;
    handle
        .with_current(ToString::to_string)
        .map_err(|e| LogError::Reload(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_parse_and_bare_words_do_not() {
        for ok in [
            "debug",
            "WARN",
            "off",
            "info,engine::rpc=debug",
            "engine=trace",
        ] {
            assert!(parse_filter(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            " ",
            "verbose",
            "info,,debug",
            "engine=loud",
            "info,chatty",
        ] {
            assert!(
                matches!(parse_filter(bad), Err(LogError::Invalid(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn without_the_subscriber_the_level_cannot_be_changed() {
        // Unit tests install no quicksplit subscriber.
        assert!(matches!(set_level("debug"), Err(LogError::NotInstalled)));
    }
}
